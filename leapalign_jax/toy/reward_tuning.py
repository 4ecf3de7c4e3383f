"""The world build's last stage: the reward tuned on its generator's own samples.

The contrastive reward (`reward.py`) ranks renders against every hard negative of their
caption, but its gradient through the decoder is partly adversarial: ascent on it raises
the reward while the checker's accuracy falls (`benchmarks/reward_signal.py`). So, in
rounds, the base generator samples train-split prompts, each sample is also pushed up the
current reward's gradient through the decoder (the directions alignment will follow), and
the checker labels every image correct or incorrect: the world's stand-in for the human
preference labels on generated images that HPSv2 and PickScore are learned from. Held-out
prompts are never used. The reward is then fine-tuned so that every correct image of a
caption (its render, the correct samples) out-scores every incorrect one (pairwise
logistic on the reward's logit scale), beside its own contrastive loss and a pull towards
where it started.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from leapalign_jax import flow, sampling
from leapalign_jax.pipeline import Batch, Params, Pipeline
from leapalign_jax.toy import checker, prompts, reward, scenes

PARTS = ("image_tower", "text_tower", "logit_scale")


def tuning_config() -> ml_collections.ConfigDict:
    """Knobs of the stage (`config.world.reward_tuning`); rounds = 0 skips it."""
    return ml_collections.ConfigDict(dict(
        rounds=2,  # sample, label, tune; each round samples with the reward it starts from
        prompts=384,  # train prompts sampled per round (category first)
        chunk=64,  # prompts per sampling call
        ascent=(0, 15, 30, 45),  # ascent steps after which each sample is kept (0: itself)
        ascent_step=0.01,  # per ascent step, in units of the latent's RMS
        steps=500,  # tuning steps per round
        batch=32,  # contrastive batch (renders and hard negatives, as in pretraining)
        rank_batch=16,  # captions per step in the ranking loss
        ranking_weight=1.0,
        # Weight of the squared distance to the contrastive reward, which holds what no
        # tuning data covers (held-out captions against their hard negatives).
        anchor_weight=1e-3,
        learning_rate=3e-4,  # Adam, global-norm clip 1
        # The parts tuned; the text tower stays, so that the captions' embeddings, which
        # the hard negatives are told apart by, stay where contrastive training put them.
        tune=("image_tower",)))


def check_config(knobs: ml_collections.ConfigDict) -> None:
    """Raises ValueError (one line, naming the knob) for knobs the stage cannot run with."""
    for name in ("rounds", "prompts", "chunk", "steps", "batch", "rank_batch"):
        if int(knobs[name]) < (0 if name == "rounds" else 1):
            raise ValueError(f"config.world.reward_tuning.{name} = {knobs[name]} must be "
                             f">= {0 if name == 'rounds' else 1}")
    if not knobs.ascent or min(knobs.ascent) < 0:
        raise ValueError(f"config.world.reward_tuning.ascent = {knobs.ascent} needs ascent "
                         "step counts >= 0, e.g. (0, 10, 20, 30)")
    unknown = set(knobs.tune) - set(PARTS)
    if unknown or not knobs.tune:
        raise ValueError(f"config.world.reward_tuning.tune = {knobs.tune}: name one or more "
                         f"of {PARTS}")


def ranking_loss(rewards: jax.Array, correct: jax.Array, scale: jax.Array) -> jax.Array:
    """Mean of softplus(scale (r_j - r_i)) over the pairs (i correct, j incorrect) of each
    caption; 0 without such a pair. rewards, correct: (G, B), G images of each of B captions."""
    diff = scale * (rewards[None, :, :] - rewards[:, None, :])  # [i, j, b] = r_j - r_i
    pairs = correct[:, None, :] & ~correct[None, :, :]
    return jnp.sum(jax.nn.softplus(diff) * pairs) / jnp.maximum(jnp.sum(pairs), 1)


def sampler(pipe: Pipeline, frozen: Params) -> dict[str, Callable[..., Any]]:
    """Jitted `rollout(params, batch, x0)`, `decode(x)` and `grad(x, reward_params,
    tokens)` (of the summed reward through the decoder) of a world's pipeline."""

    def rollout(params, batch, x0):
        velocity = sampling.conditioned_velocity(pipe, batch)
        return flow.euler_rollout(velocity, params, x0, pipe.sigmas)[0]

    def reward_sum(x, reward_params, tokens):
        return jnp.sum(reward.reward_fn(reward_params, pipe.decode(frozen, x), tokens))

    return {"rollout": jax.jit(rollout), "decode": jax.jit(lambda x: pipe.decode(frozen, x)),
            "grad": jax.jit(jax.grad(reward_sum))}


def labelled_samples(fns: dict[str, Callable[..., Any]], pipe: Pipeline, generator: Params,
                     batch: Batch, chosen: Sequence[prompts.Prompt], reward_params: Params,
                     key: jax.Array, ascent: Sequence[int], step: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Images (len(ascent), B, H, W, 3) of one sample per prompt after each number of
    normalised ascent steps on `reward_params`, and the checker's labels (len(ascent), B)."""
    x = fns["rollout"](generator, batch, sampling.initial_noise(key, batch, pipe))
    tokens = jnp.asarray(batch["tokens"])
    images = []
    for k in range(max(ascent) + 1):
        if k in ascent:
            images.append(np.asarray(fns["decode"](x)))
        if k < max(ascent):
            g = fns["grad"](x, reward_params, tokens)
            x = x + step * g / (jnp.sqrt(jnp.mean(g * g, axis=(1, 2), keepdims=True)) + 1e-12)
    images = np.stack(images)
    labels = np.array([[checker.check(im, p) for im, p in zip(row, chosen)] for row in images])
    return images, labels


def tune_reward(reward_params: Params, generators: Sequence[Params], pipe: Pipeline,
                frozen: Params, batch_of: Callable[[Sequence[prompts.Prompt]], Batch],
                knobs: ml_collections.ConfigDict, seed: int, progress: bool = True,
                on_round: Callable[[Params, dict[str, Any]], None] | None = None
                ) -> tuple[Params, list[dict[str, Any]]]:
    """The tuned reward and a record per round (the checker's accuracy along the ascent,
    before that round's tuning, per generator; first and last losses; seconds). Every
    generator samples every chosen prompt; their images of a caption are ranked together.
    `frozen` holds the VAE the samples are decoded with; `on_round(params, record)` sees
    each round's result."""
    check_config(knobs)
    ascent = sorted(set(int(a) for a in knobs.ascent))
    rng = np.random.default_rng(seed)
    train_pool = list(prompts.train_prompts())
    contrastive_pool = reward.reward_training_pool()
    fns = sampler(pipe, frozen)
    labels = {k: "tune" if k in knobs.tune else "keep" for k in reward_params}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
        {"tune": optax.adam(knobs.learning_rate), "keep": optax.set_to_zero()}, labels))
    start = reward_params

    def loss(params, c, r):
        contrastive = reward.contrastive_loss(params, c["images"], c["ids"],
                                              c["negative_ids"], c["positive"])
        g, b = r["correct"].shape
        scores = reward.reward_fn(params, r["images"].reshape((g * b,) + r["images"].shape[2:]),
                                  jnp.tile(r["tokens"], (g, 1))).reshape(g, b)
        scale = jnp.exp(jnp.minimum(params["logit_scale"], np.log(100.0)))
        ranking = ranking_loss(scores, r["correct"], scale)
        # Keeps what the tuning data does not cover (held-out captions' hard negatives)
        # near where contrastive training left it.
        anchor = sum(jnp.sum(jnp.square(a - b)) for a, b in
                     zip(jax.tree.leaves(params), jax.tree.leaves(start)))
        total = contrastive + knobs.ranking_weight * ranking + knobs.anchor_weight * anchor
        return total, jnp.stack([contrastive, ranking, anchor])

    @jax.jit
    def step(state, c, r):
        params, opt_state = state
        (_, parts), grads = jax.value_and_grad(loss, has_aux=True)(params, c, r)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), parts

    state, records = (reward_params, tx.init(reward_params)), []
    for rnd in range(knobs.rounds):
        t0 = time.time()
        chosen = prompts.sample_prompts(rng, knobs.prompts, train_pool)
        sampled = []  # per generator: (images, labels), each (len(ascent), len(chosen), ...)
        for g, generator in enumerate(generators):

            def key(i):  # the first generator's keys are those of a one-generator build
                k = jax.random.key(seed * 1000 + rnd * 100 + i // knobs.chunk)
                return jax.random.fold_in(k, g) if g else k

            parts = [labelled_samples(fns, pipe, generator, batch_of(chosen[i:i + knobs.chunk]),
                                      chosen[i:i + knobs.chunk], state[0], key(i), ascent,
                                      knobs.ascent_step)
                     for i in range(0, len(chosen), knobs.chunk)]
            sampled.append(tuple(np.concatenate([p[k] for p in parts], 1) for k in (0, 1)))
        renders = scenes.render_batch([prompts.scene_for_prompt(p, rng) for p in chosen])
        images = np.concatenate([renders[None]] + [im for im, _ in sampled])
        correct = np.concatenate([np.ones((1, len(chosen)), bool)]  # renders are correct
                                 + [ok for _, ok in sampled])
        tokens = np.asarray(batch_of(chosen)["tokens"])
        sample_s = time.time() - t0
        losses = []  # device values: read once the round is done, not a sync per step
        for _ in tqdm(range(knobs.steps), desc=f"reward tuning {rnd + 1}/{knobs.rounds}",
                      disable=not progress, leave=False):
            c = reward.make_batch(rng, knobs.batch, 6, contrastive_pool)
            rows = rng.choice(len(chosen), min(knobs.rank_batch, len(chosen)), replace=False)
            r = {"images": images[:, rows], "tokens": tokens[rows], "correct": correct[:, rows]}
            state, parts_of_loss = step(state, c, r)
            losses.append(parts_of_loss)
        first, last = (dict(zip(("contrastive", "ranking", "anchor"),
                                np.asarray(v, np.float64).round(5).tolist()))
                       for v in (losses[0], losses[-1]))
        along = [{str(a): round(float(ok[i].mean()), 4) for i, a in enumerate(ascent)}
                 for _, ok in sampled]
        records.append({"round": rnd, "checker_accuracy_along_ascent": along[0],
                        **({"per_generator": along} if len(along) > 1 else {}),
            "loss_first_step": first, "loss_last_step": last, "sample_s": round(sample_s, 1),
            "tune_s": round(time.time() - t0 - sample_s, 1)})
        if on_round is not None:
            on_round(state[0], records[-1])
    return state[0], records
