"""The toy reward model: a CLIP-style image/text scorer, the shapes world's HPSv2.

Two towers map an image and a caption to L2-normalised embeddings; the reward is their
cosine similarity, as HPSv2 scores an image by the cosine of its CLIP embeddings.

- Image tower: a small convnet at 8x8 (each 4x4 pixel patch one position) whose
  non-negative feature maps are pooled into their mass and first moments along x and y
  ("how much of feature c, and where"), then an MLP. The moments make "where" a linear
  function of the image, which spatial relations need.
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
prompts, the hard ones, are drawn more often (`CATEGORY_WEIGHTS`). Trained on
train-split prompts only; `pairwise_accuracy` on held-out prompts measures how often the
true caption beats each of its hard negatives.
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
# How often each category is drawn in reward training, relative to the others.
CATEGORY_WEIGHTS = {"single_object": 1.0, "two_object": 1.0, "counting": 1.0, "colors": 1.0,
                    "position": 5.0, "color_attr": 2.0}


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class ImageTower(nn.Module):
    """(B, 32, 32, 3) in [0, 1] -> unnormalised embeddings (B, embed_dim)."""

    width: int = 64
    depth: int = 2
    embed_dim: int = EMBED_DIM

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = nn.Conv(self.width, (3, 3))(space_to_depth(images * 2.0 - 1.0, 4))
        for _ in range(self.depth):
            x = ResBlock(self.width)(x)
        h = nn.relu(nn.Conv(self.width, (1, 1))(nn.silu(x)))  # (B, 8, 8, C) >= 0
        n = h.shape[1]
        coord = (jnp.arange(n) + 0.5) / n * 2.0 - 1.0  # pixel-centre coordinates in [-1, 1]
        mass = jnp.sum(h, axis=(1, 2))
        mx = jnp.sum(h * coord[None, None, :, None], axis=(1, 2))
        my = jnp.sum(h * coord[None, :, None, None], axis=(1, 2))
        # /8: an object covers about 8 positions, so the moments are O(1) per object.
        z = nn.LayerNorm()(jnp.concatenate([mass, mx, my], axis=-1) / 8.0)
        return nn.Dense(self.embed_dim)(nn.silu(nn.Dense(4 * self.embed_dim)(z)))


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


def train_reward(rng: jax.Array, steps: int = 2000, batch: int = 32,
                 num_negatives: int = 4, learning_rate: float = 2e-3,
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

    pool = prompts.train_prompts()
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
