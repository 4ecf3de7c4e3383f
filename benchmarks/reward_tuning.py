"""Tuning the shapes world's reward on the generator's own samples.

The shipped reward ranks renders against every hard negative of their caption, but its
gradient through the decoder is partly adversarial (`reward_signal.py`): ascent raises the
reward while the checker's accuracy falls. This experiment fine-tunes the reward, in
rounds, on samples of the base generator for train-split prompts, each also pushed up the
current reward's gradient through the decoder (the directions alignment will follow),
every image labelled correct or incorrect by the checker. That is the world's stand-in for
human preference labels on generated images, from which HPSv2 and PickScore are learned;
held-out prompts are never used. The loss: every correct image of a caption (its render,
the correct samples) out-scores every incorrect one (pairwise logistic on the reward's
logit scale), beside the reward's own contrastive loss on renders.

    python benchmarks/reward_tuning.py --cache-out /tmp/shapes_tuned \\
        --out benchmarks/results/reward_tuning
    python benchmarks/reward_signal.py --cache-dir /tmp/shapes_tuned --out ...
    python benchmarks/compare_methods.py --cache-dir /tmp/shapes_tuned --methods leapalign ...

`--cache-out` receives a copy of the world's cache with the tuned reward under the
reward's file name, so every benchmark runs on it unchanged. Writes `reward_tuning.json`
and `.md`: the checker's accuracy along the ascent in each round (before that round's
tuning) and the held-out pairwise accuracy per negative kind before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # reward_signal


def ranking_loss(rewards: Any, correct: Any, scale: Any) -> Any:
    """Mean of softplus(scale (r_j - r_i)) over the pairs (i correct, j incorrect) of each
    caption. rewards, correct: (G, B), G images of each of B captions."""
    import jax
    import jax.numpy as jnp

    diff = scale * (rewards[None, :, :] - rewards[:, None, :])  # [i, j, b] = r_j - r_i
    pairs = correct[:, None, :] & ~correct[None, :, :]
    return jnp.sum(jax.nn.softplus(diff) * pairs) / jnp.maximum(jnp.sum(pairs), 1)


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """The shapes world and the jitted pieces: samples, their ascent, decode."""
    import jax
    import jax.numpy as jnp

    from leapalign_jax import flow, sampling
    from leapalign_jax.toy import reward
    from reward_signal import shapes_world

    config, world, batch_of = shapes_world(args.tiny, args.cache_dir)
    pipe, frozen = world.pipe, world.frozen

    def rollout(params, batch, x0):
        velocity = sampling.conditioned_velocity(pipe, batch)
        return flow.euler_rollout(velocity, params, x0, pipe.sigmas)[0]

    def reward_sum(x, reward_params, tokens):
        return jnp.sum(reward.reward_fn(reward_params, pipe.decode(frozen, x), tokens))

    return {"config": config, "pipe": pipe, "params": world.params, "batch_of": batch_of,
            "reward": frozen["reward"], "rollout": jax.jit(rollout),
            "decode": jax.jit(lambda x: pipe.decode(frozen, x)),
            "grad": jax.jit(jax.grad(reward_sum))}


def labelled_samples(s: dict[str, Any], reward_params: Any, chosen: list, key: Any,
                     ascent: list[int], step: float) -> tuple[np.ndarray, np.ndarray]:
    """Images (len(ascent), B, H, W, 3) of one base sample per prompt after each number of
    normalised ascent steps on `reward_params`, and the checker's labels (len(ascent), B)."""
    import jax.numpy as jnp

    from leapalign_jax import sampling
    from leapalign_jax.toy import checker

    batch = s["batch_of"](chosen)
    x = s["rollout"](s["params"], batch, sampling.initial_noise(key, batch, s["pipe"]))
    tokens = jnp.asarray(batch["tokens"])
    images = []
    for k in range(max(ascent) + 1):
        if k in ascent:
            images.append(np.asarray(s["decode"](x)))
        if k < max(ascent):
            g = s["grad"](x, reward_params, tokens)
            x = x + step * g / (jnp.sqrt(jnp.mean(g * g, axis=(1, 2), keepdims=True)) + 1e-12)
    images = np.stack(images)
    labels = np.array([[checker.check(im, p) for im, p in zip(row, chosen)] for row in images])
    return images, labels


def tune(s: dict[str, Any], args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]]]:
    """The rounds: sample and label with the current reward, then fine-tune on them."""
    import jax
    import jax.numpy as jnp
    import optax

    from leapalign_jax.toy import prompts, reward, scenes

    rng = np.random.default_rng(args.seed)
    train_pool = list(prompts.train_prompts())
    contrastive_pool = reward.reward_training_pool()
    # Towers not in --tune keep their weights (e.g. the text tower, so that the captions'
    # embeddings, which the hard negatives are told apart by, stay where they were).
    labels = {k: "tune" if k in args.tune else "keep" for k in s["reward"]}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
        {"tune": optax.adam(args.learning_rate), "keep": optax.set_to_zero()}, labels))

    def loss(params, c, r):
        contrastive = reward.contrastive_loss(params, c["images"], c["ids"],
                                              c["negative_ids"], c["positive"])
        g, b = r["correct"].shape
        scores = reward.reward_fn(params, r["images"].reshape((g * b,) + r["images"].shape[2:]),
                                  jnp.tile(r["tokens"], (g, 1))).reshape(g, b)
        scale = jnp.exp(jnp.minimum(params["logit_scale"], np.log(100.0)))
        ranking = ranking_loss(scores, r["correct"], scale)
        return contrastive + args.ranking_weight * ranking, (contrastive, ranking)

    @jax.jit
    def step(state, c, r):
        params, opt_state = state
        (_, parts), grads = jax.value_and_grad(loss, has_aux=True)(params, c, r)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), parts

    state, rounds = (s["reward"], tx.init(s["reward"])), []
    for rnd in range(args.rounds):
        t0 = time.time()
        chosen = prompts.sample_prompts(rng, args.prompts, train_pool)
        parts = [labelled_samples(s, state[0], chosen[i:i + args.chunk],
                                  jax.random.key(args.seed * 1000 + rnd * 100 + i // args.chunk),
                                  args.ascent, args.step)
                 for i in range(0, len(chosen), args.chunk)]
        images = np.concatenate([p[0] for p in parts], axis=1)
        labels = np.concatenate([p[1] for p in parts], axis=1)
        renders = scenes.render_batch([prompts.scene_for_prompt(p, rng) for p in chosen])
        images = np.concatenate([renders[None], images])  # renders satisfy their caption
        labels = np.concatenate([np.ones((1, len(chosen)), bool), labels])
        tokens = np.asarray(s["batch_of"](chosen)["tokens"])
        sample_s = time.time() - t0
        losses = []  # device values: read once the round is done, not a sync per step
        for i in range(args.steps):
            c = reward.make_batch(rng, args.batch, 6, contrastive_pool)
            rows = rng.choice(len(chosen), min(args.rank_batch, len(chosen)), replace=False)
            r = {"images": images[:, rows], "tokens": tokens[rows], "correct": labels[:, rows]}
            state, (contrastive, ranking) = step(state, c, r)
            losses.append((contrastive, ranking))
        first, last = ([float(v) for v in pair] for pair in (losses[0], losses[-1]))
        rounds.append({"round": rnd, "checker_accuracy_along_ascent": {
            str(a): round(float(labels[1 + i].mean()), 4) for i, a in enumerate(args.ascent)},
            "loss_first_step": first, "loss_last_step": last,
            "sample_s": round(sample_s, 1), "tune_s": round(time.time() - t0 - sample_s, 1)})
        print(json.dumps(rounds[-1]), flush=True)
    return state[0], rounds


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Tuning the reward on the generator's samples", "",
             f"`{result['command']}` ({result['machine']}, {result['elapsed_s']:.0f} s).", "",
             "Checker accuracy of the base samples (train prompts) along ascent on the "
             "reward of that round, before the round's tuning:", "",
             "| round | " + " | ".join(f"step {a}" for a in result["ascent"]) + " |",
             "|---|" + "---|" * len(result["ascent"])]
    for r in result["rounds"]:
        lines.append(f"| {r['round']} | " + " | ".join(
            f"{r['checker_accuracy_along_ascent'][str(a)]:.3f}" for a in result["ascent"]) + " |")
    kinds = list(result["pairwise_before"])
    lines += ["", "Held-out pairwise accuracy (true caption over each hard negative):", "",
              "| reward | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name in ("before", "after"):
        acc = result[f"pairwise_{name}"]
        lines.append(f"| {name} | " + " | ".join(f"{acc[k]:.4f}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default="", help="the shapes-world cache to start "
                        "from (default: the config's; the shipped models are copied into it)")
    parser.add_argument("--cache-out", required=True,
                        help="where the copy of the cache with the tuned reward goes")
    parser.add_argument("--tiny", action="store_true", help="the :tiny world (smoke run)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=256, help="train prompts per round")
    parser.add_argument("--chunk", type=int, default=64, help="prompts per sampling call")
    parser.add_argument("--ascent", type=int, nargs="+", default=[0, 10, 20, 30],
                        help="ascent steps at which each sample is kept (0: the sample)")
    parser.add_argument("--step", type=float, default=0.01,
                        help="ascent step, in units of the latent RMS (default 0.01)")
    parser.add_argument("--steps", type=int, default=500, help="tuning steps per round")
    parser.add_argument("--batch", type=int, default=32, help="contrastive batch")
    parser.add_argument("--rank-batch", type=int, default=16, help="captions per step")
    parser.add_argument("--ranking-weight", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--tune", nargs="+", default=["image_tower", "text_tower", "logit_scale"],
                        choices=["image_tower", "text_tower", "logit_scale"],
                        help="the reward's parts that are tuned (default: all)")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                      "reward_tuning"))
    args = parser.parse_args(argv)
    if min(args.rounds, args.prompts, args.chunk, args.steps, args.rank_batch) < 1 \
            or min(args.ascent) < 0:
        parser.error("--rounds, --prompts, --chunk, --steps and --rank-batch must be >= 1, "
                     "--ascent steps >= 0")
    args.ascent = sorted(set(args.ascent))
    start = time.time()
    s = setup(args)
    from leapalign_jax import paths
    from leapalign_jax.toy import cache, reward
    from leapalign_jax.toy import world as shapes
    from reward_signal import write_results

    wc = s["config"].world
    before = reward.pairwise_accuracy(s["reward"])
    tuned, rounds = tune(s, args)
    after = reward.pairwise_accuracy(tuned)
    reward_file = shapes.model_files(wc)["reward"]
    for name in paths.listdir(wc.cache_dir):  # the other models, as they are (gs:// too)
        source = paths.join(wc.cache_dir, name)
        if name != reward_file and not paths.isdir(source) \
                and paths.join(args.cache_out, name) != source:
            paths.write_bytes(paths.join(args.cache_out, name), paths.read_bytes(source))
    cache.save_params(paths.join(args.cache_out, reward_file), tuned)
    result = {"command": "python benchmarks/reward_tuning.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
              "ascent": args.ascent, "rounds": rounds,
              "pairwise_before": {k: round(v, 4) for k, v in before.items()},
              "pairwise_after": {k: round(v, 4) for k, v in after.items()},
              "elapsed_s": round(time.time() - start, 1)}
    write_results(args.out, "reward_tuning", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
