"""The toy reward model: a CLIP-style image/text scorer, the shapes world's HPSv2.

Two towers map an image and a caption to L2-normalised embeddings; the reward is their
cosine similarity, as HPSv2 scores an image by the cosine of its CLIP embeddings.

- Image tower: a small convnet on a 16x16 grid (each 2x2 pixel patch one cell) whose
  non-negative feature maps are pooled into "how much of feature c, and where": mass,
  first moments, centre of mass, spread and skew, and mass at local peaks (a count of
  blobs rather than their area). Sixteen more "object" maps give, for every pair of
  them, the sign of their centres' difference along x and y ("object i is left of
  object j"), and their peaks give counts that no colour or shape owns. Pooling makes
  "where" a simple function of the image, which spatial relations need.
- Text tower: a small transformer (the `Block`s of the generator's text encoder, with
  its own parameters) whose per-token features are flattened in word order before an
  MLP. A mean over tokens sees the same bag of words in "a red square and a blue
  circle" and its binding swap "a blue square and a red circle", or in "a red square
  to the left of a blue circle" and "a blue circle to the left of a red square";
  keeping the word slots lets the MLP bind attributes and relations to roles.

Training is contrastive: InfoNCE over the batch in both directions, where every caption
of the batch that an image also satisfies counts as a positive (e.g. "a circle" for the
image of "a red circle"), plus per image `num_negatives` hard negatives from
`prompts.hard_negatives`: the caption with a colour or shape changed, a wrong count, the
opposite relation, or the two objects' colours swapped. Position and attribute-binding
prompts, the hard ones, are drawn more often (`CATEGORY_WEIGHTS`), and same-colour
position prompts, told apart by shape alone, more often still. Trained on train-split
prompts only; `pairwise_accuracy` on held-out prompts measures how often the true caption
beats each of its hard negatives.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from leapalign_jax.pipeline import Params
from leapalign_jax.toy import prompts, scenes, tokenizer, utils
from leapalign_jax.toy.autoencoder import ResBlock, space_to_depth
from leapalign_jax.toy.prompts import Prompt
from leapalign_jax.toy.text_encoder import Block

EMBED_DIM = 64
VERSION = 2  # of the architecture and training recipe; part of the cache file name
NUM_OBJECT_MAPS = 16  # maps whose pairwise centre differences the image tower pools
PATCH = 2  # pixels per cell of the image tower's grid: 32x32 images -> 16x16
SAME_COLOUR_POSITION_COPIES = 3  # see `reward_training_pool`
# How often each category is drawn in reward training, relative to the others.
CATEGORY_WEIGHTS = {"single_object": 1.0, "two_object": 1.0, "counting": 4.0, "colors": 1.0,
                    "position": 10.0, "color_attr": 2.0}


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class ImageTower(nn.Module):
    """(B, 32, 32, 3) in [0, 1] -> unnormalised embeddings (B, embed_dim).

    A convnet on a `32 / patch` grid, whose non-negative feature maps are pooled into
    "how much of feature c, and where" (`_pool`), plus `NUM_OBJECT_MAPS` object maps whose
    pairwise centre differences say which object is left of / above which (`_pairs`).
    """

    width: int = 64
    depth: int = 2
    patch: int = PATCH
    embed_dim: int = EMBED_DIM

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = nn.Conv(self.width, (3, 3))(space_to_depth(images * 2.0 - 1.0, self.patch))
        for _ in range(self.depth):
            x = ResBlock(self.width)(x)
        # Scaled so that an object covers about 8 units of mass at any grid size.
        area = (self.patch / 4.0) ** 2
        h = area * nn.relu(nn.Conv(self.width, (1, 1))(nn.silu(x)))  # (B, n, n, C) >= 0
        o = area * nn.relu(nn.Conv(NUM_OBJECT_MAPS, (1, 1))(nn.silu(x)))  # (B, n, n, K)
        # Counts that no colour or shape owns: the peaks of the object maps and of all
        # features together, so "two" vs "three" transfers to colour-shape pairs never
        # counted in training.
        counts = [_peak_mass(o), _peak_mass(jnp.sum(h, axis=-1, keepdims=True) / 8.0)]
        z = nn.LayerNorm()(jnp.concatenate(_pool(h) + _pairs(o) + counts, axis=-1) / 8.0)
        return nn.Dense(self.embed_dim)(nn.silu(nn.Dense(4 * self.embed_dim)(z)))


def _coords(n: int) -> tuple[jax.Array, jax.Array]:
    """Pixel-centre coordinates in [-1, 1], shaped to broadcast against (B, n, n, C)."""
    c = (jnp.arange(n) + 0.5) / n * 2.0 - 1.0
    return c[None, None, :, None], c[None, :, None, None]  # x (columns), y (rows)


def _pool(h: jax.Array) -> list[jax.Array]:
    """Per channel of `h` (B, n, n, C): mass, first moments, centre of mass, central 2nd
    and 3rd moments and local-maxima mass, each (B, C)."""
    x, y = _coords(h.shape[1])
    mass = jnp.sum(h, axis=(1, 2))
    mx, my = jnp.sum(h * x, axis=(1, 2)), jnp.sum(h * y, axis=(1, 2))
    # Centre of mass (soft-argmax): where feature c is, independent of how much of it
    # there is, so "x_a < x_b" is linear in the features.
    cx, cy = mx / (mass + 0.1), my / (mass + 0.1)
    # Spread and skew of where feature c is: with two objects of one colour, the skew
    # says on which side of their common centre the bigger one lies.
    w = h / (mass[:, None, None, :] + 0.1)
    dx, dy = x - cx[:, None, None, :], y - cy[:, None, None, :]
    moments = [8.0 * jnp.sum(w * dx ** 2, axis=(1, 2)), 8.0 * jnp.sum(w * dy ** 2, axis=(1, 2)),
               32.0 * jnp.sum(w * dx ** 3, axis=(1, 2)), 32.0 * jnp.sum(w * dy ** 3, axis=(1, 2))]
    return [mass, mx, my, 8.0 * cx, 8.0 * cy, *moments, _peak_mass(h)]


def _peak_mass(h: jax.Array) -> jax.Array:
    """Per channel of `h` (B, n, n, C), its mass at local maxima (3x3): about one peak per
    blob, so a count of objects rather than their area (four triangles cover about what
    three squares do). (B, C)."""
    peak = jax.lax.stop_gradient(h >= nn.max_pool(h, (3, 3), padding="SAME"))
    return jnp.sum(h * peak, axis=(1, 2))


def _pairs(o: jax.Array) -> list[jax.Array]:
    """For every pair i < j of the object maps `o` (B, n, n, K): the sign-like difference
    of their centres along x and y, gated by both being present (B, K(K-1)/2) each."""
    x, y = _coords(o.shape[1])
    mass = jnp.sum(o, axis=(1, 2))
    ox, oy = jnp.sum(o * x, axis=(1, 2)) / (mass + 0.1), jnp.sum(o * y, axis=(1, 2)) / (mass + 0.1)
    present = mass / (mass + 1.0)
    i, j = np.triu_indices(o.shape[-1], 1)
    gate = present[:, i] * present[:, j]
    return [8.0 * jnp.tanh(4.0 * (ox[:, i] - ox[:, j])) * gate,
            8.0 * jnp.tanh(4.0 * (oy[:, i] - oy[:, j])) * gate]


class TextTower(nn.Module):
    """token ids (B, S) -> unnormalised embeddings (B, embed_dim)."""

    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 2
    slot_dim: int = 64
    embed_dim: int = EMBED_DIM

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        mask = ids != tokenizer.PAD_ID
        x = nn.Embed(tokenizer.vocab_size(), self.width,
                     embedding_init=nn.initializers.normal(0.02))(ids)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02),
                           (tokenizer.MAX_LEN, self.width))[: ids.shape[1]]
        for _ in range(self.depth):
            x = Block(self.width, self.num_heads, self.mlp_ratio)(x, mask)
        x = nn.Dense(self.slot_dim)(nn.LayerNorm()(x)) * mask[..., None]
        x = nn.silu(nn.Dense(4 * self.embed_dim)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.embed_dim)(x)


class RewardModel(nn.Module):
    """CLIP-style towers with a learnt contrastive temperature."""

    embed_dim: int = EMBED_DIM

    def setup(self):
        self.image_tower = ImageTower(embed_dim=self.embed_dim)
        self.text_tower = TextTower(embed_dim=self.embed_dim)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(10.0)), ())

    def embed_images(self, images: jax.Array) -> jax.Array:
        return _normalize(self.image_tower(images))

    def embed_texts(self, ids: jax.Array) -> jax.Array:
        return _normalize(self.text_tower(ids))

    def __call__(self, images: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.embed_images(images), self.embed_texts(ids)


def init_reward(rng: jax.Array) -> Params:
    images = jnp.zeros((1, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3))
    ids = jnp.zeros((1, tokenizer.MAX_LEN), jnp.int32)
    return nn.meta.unbox(RewardModel().init(rng, images, ids)["params"])


def reward_fn(params: Params, images: jax.Array, token_ids: jax.Array) -> jax.Array:
    """Cosine similarity of image and caption embeddings, (B,); differentiable in images.

    Args:
      params: reward-model params (from `train_reward`).
      images: (B, 32, 32, 3) in [0, 1].
      token_ids: (B, S) ids from `tokenizer.encode`.
    """
    img, txt = RewardModel().apply({"params": params}, images, token_ids)
    return jnp.sum(img * txt, axis=-1)


def _multi_positive_nce(logits: jax.Array, positive: jax.Array) -> jax.Array:
    """Mean over rows of -log(softmax mass on the row's positives)."""
    pos = jnp.where(positive, logits, -jnp.inf)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jax.nn.logsumexp(pos, axis=-1))


def contrastive_loss(params: Params, images: jax.Array, ids: jax.Array,
                     negative_ids: jax.Array, positive: jax.Array) -> jax.Array:
    """InfoNCE both ways over the batch plus per-image hard negatives.

    Args:
      images: (B, 32, 32, 3); ids: (B, S) their captions.
      negative_ids: (B, K, S) hard-negative captions of each image.
      positive: bool (B, B), [i, j] = image i satisfies caption j (diagonal true).
    """
    model = RewardModel()
    b, k, s = negative_ids.shape
    img, txt = model.apply({"params": params}, images, ids)
    neg = model.apply({"params": params}, negative_ids.reshape(b * k, s),
                      method=RewardModel.embed_texts).reshape(b, k, -1)
    scale = jnp.exp(jnp.minimum(params["logit_scale"], np.log(100.0)))
    batch_logits = scale * img @ txt.T
    neg_logits = scale * jnp.einsum("bd,bkd->bk", img, neg)
    image_to_text = _multi_positive_nce(
        jnp.concatenate([batch_logits, neg_logits], axis=1),
        jnp.concatenate([positive, jnp.zeros((b, k), bool)], axis=1))
    text_to_image = _multi_positive_nce(batch_logits.T, positive.T)
    return 0.5 * (image_to_text + text_to_image)


@functools.lru_cache(maxsize=None)
def _negatives_by_kind(prompt: Prompt) -> tuple[tuple[str, ...], ...]:
    """Training negatives of a prompt, grouped by kind. Held-out prompts' texts are left
    out (unless nothing else is left), so that held-out accuracy measures captions the
    model has never seen."""
    held = {p.text for p in prompts.heldout_prompts()}
    negatives = prompts.hard_negatives(prompt)
    kept = [(k, p) for k, p in negatives if p.text not in held] or negatives
    by_kind: dict[str, list[str]] = {}
    for kind, p in kept:
        by_kind.setdefault(kind, []).append(p.text)
    return tuple(tuple(v) for v in by_kind.values())


def sample_negatives(rng: np.random.Generator, prompt: Prompt, k: int) -> list[str]:
    """`k` hard-negative texts for training: kinds in a random order, each once before
    any repeats, and one random caption of each kind drawn.

    Going by kind keeps the rare, hard kinds (one opposite relation, one colour swap) as
    frequent as the many recolourings.
    """
    groups = _negatives_by_kind(prompt)
    kinds = np.concatenate([rng.permutation(len(groups)) for _ in range(-(-k // len(groups)))])
    return [groups[i][rng.integers(len(groups[i]))] for i in kinds[:k]]


def make_batch(rng: np.random.Generator, batch: int, num_negatives: int,
               pool: Sequence[Prompt] | None = None) -> dict[str, np.ndarray]:
    """One contrastive batch: images, caption ids, hard-negative ids, positive mask."""
    chosen, drawn = prompts.sample_pairs(rng, batch, pool, CATEGORY_WEIGHTS)
    negatives = [t for p in chosen for t in sample_negatives(rng, p, num_negatives)]
    positive = np.array([[prompts.satisfies(s.objects, p) for p in chosen] for s in drawn])
    return {"images": scenes.render_batch(drawn),
            "ids": tokenizer.encode([p.text for p in chosen]),
            "negative_ids": tokenizer.encode(negatives).reshape(batch, num_negatives, -1),
            "positive": positive}


def reward_training_pool() -> list[Prompt]:
    """The train split, with each same-colour position prompt ("a red square above a red
    triangle") `SAME_COLOUR_POSITION_COPIES` times: only shape tells those two objects
    apart, and they are a fifth of the position prompts."""
    pool = list(prompts.train_prompts())
    same = [p for p in pool if p.category == "position" and p.objects[0][0] == p.objects[1][0]]
    return pool + same * (SAME_COLOUR_POSITION_COPIES - 1)


def train_reward(rng: jax.Array, steps: int = 2000, batch: int = 32,
                 num_negatives: int = 6, learning_rate: float = 2e-3,
                 progress: bool = True, return_losses: bool = False):
    """Trains the reward model contrastively on train-split prompts: Adam with global-norm
    clipping, linear warm-up, cosine decay to 5% of the peak rate.

    Returns params, or (params, per-step losses) with `return_losses`.
    """
    if steps < 1 or batch < 2 or num_negatives < 1:
        raise ValueError(f"train_reward needs steps >= 1, batch >= 2, num_negatives >= 1; "
                         f"got steps={steps}, batch={batch}, num_negatives={num_negatives}")
    k_init, k_data = jax.random.split(rng)
    data = utils.numpy_rng(k_data)
    params = init_reward(k_init)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(
        optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, min(100, steps // 10)),
                                           steps, 0.05 * learning_rate)))

    @jax.jit
    def step(state, b):
        params, opt_state = state
        loss, grads = jax.value_and_grad(contrastive_loss)(
            params, b["images"], b["ids"], b["negative_ids"], b["positive"])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    pool = reward_training_pool()
    (params, _), losses = utils.fit(
        step, (params, tx.init(params)),
        lambda i: make_batch(data, batch, num_negatives, pool), steps, "reward", progress)
    return (params, losses) if return_losses else params


def pairwise_accuracy(params: Params, pool: Sequence[Prompt] | None = None,
                      scenes_per_prompt: int = 2, seed: int = 0,
                      transform: Callable[[np.ndarray], np.ndarray] | None = None
                      ) -> dict[str, float]:
    """How often the true caption out-scores each hard negative, by negative kind.

    Every prompt of `pool` (default: the held-out prompts) is rendered
    `scenes_per_prompt` times (then passed through `transform`, e.g. a VAE round trip)
    and scored against all its hard negatives. Keys: the negative kinds, and "overall"
    over all pairs.
    """
    pool = prompts.heldout_prompts() if pool is None else pool
    rng = np.random.default_rng(seed)
    embed_images = jax.jit(lambda p, x: RewardModel().apply(
        {"params": p}, x, method=RewardModel.embed_images))
    embed_texts = jax.jit(lambda p, t: RewardModel().apply(
        {"params": p}, t, method=RewardModel.embed_texts))
    wins: dict[str, list[bool]] = {}
    for prompt in pool:
        negatives = prompts.hard_negatives(prompt)
        images = scenes.render_batch(
            [prompts.scene_for_prompt(prompt, rng) for _ in range(scenes_per_prompt)])
        img = embed_images(params, images if transform is None else transform(images))
        txt = embed_texts(params, tokenizer.encode(
            [prompt.text] + [p.text for _, p in negatives]))
        sims = np.asarray(img @ txt.T)  # (scenes, 1 + negatives)
        for j, (kind, _) in enumerate(negatives, start=1):
            wins.setdefault(kind, []).extend(sims[:, 0] > sims[:, j])
    out = {kind: float(np.mean(v)) for kind, v in sorted(wins.items())}
    out["overall"] = float(np.mean([w for v in wins.values() for w in v]))
    return out
