"""The shapes world's reward-tuning stage, with its knobs on the command line and measured.

The world build's last stage (`leapalign_jax/toy/reward_tuning.py`) tunes the contrastive
reward on the base generator's samples of train prompts, pushed up the reward's gradient
and labelled by the checker. This script runs that stage from the contrastive reward with
any knobs (defaults: the world's), and reports per round the checker's accuracy along the
ascent (before the round's tuning) and the held-out pairwise accuracy per negative kind.
With `--from-tuned --generator-runs DIR...` it is a further stage instead: the world's
tuned reward is tuned again on the samples of the base generator and of aligned ones (the
newest EMA params of each training run), as preference data is gathered from the models
being aligned.

    python benchmarks/reward_tuning.py --cache-out /tmp/shapes_tuned \\
        --out benchmarks/results/reward_tuning
    python benchmarks/reward_signal.py --cache-dir /tmp/shapes_tuned --out ...
    python benchmarks/compare_methods.py --cache-dir /tmp/shapes_tuned --methods leapalign ...

`--cache-out` receives a copy of the world's cache with the tuned reward under the file
name of the config's own tuning knobs, so every benchmark and the main job run on it
unchanged. Writes `reward_tuning.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # reward_signal


def tune(args: argparse.Namespace) -> tuple[Any, Any, list[dict[str, Any]], Any]:
    """(config, starting reward, round records, tuned reward): the world built without its
    tuning stage (with it, under `--from-tuned`), then the stage run with the command
    line's knobs, sampling the base generator and those of `--generator-runs`."""
    from leapalign_jax import tasks
    from leapalign_jax.toy import reward, reward_tuning
    from leapalign_jax.toy import world as shapes
    from reward_signal import shapes_world

    knobs = shapes.shapes_config().reward_tuning
    knobs.update(rounds=args.rounds, prompts=args.prompts, chunk=args.chunk,
                 ascent=tuple(sorted(set(args.ascent))), ascent_step=args.step,
                 steps=args.steps, batch=args.batch, rank_batch=args.rank_batch,
                 ranking_weight=args.ranking_weight, anchor_weight=args.anchor_weight,
                 learning_rate=args.learning_rate, tune=tuple(args.tune))
    reward_tuning.check_config(knobs)  # before the world is loaded
    config, world, batch_of = shapes_world(args.tiny, args.cache_dir, tuned=args.from_tuned)
    start = world.frozen["reward"]
    generators = [world.params]
    for run in args.generator_runs:
        params, step = tasks.latest_params(config, run, world)
        if step == 0:
            raise SystemExit(f"--generator-runs {run}: no checkpoint there; pass the workdir "
                             "of a training run on this world")
        generators.append(params)

    def on_round(params, record):
        record["pairwise_after"] = {k: round(v, 4) for k, v in
                                    reward.pairwise_accuracy(params).items()}
        print(json.dumps(record), flush=True)

    tuned, rounds = reward_tuning.tune_reward(start, generators, world.pipe, world.frozen,
                                              batch_of, knobs, args.seed, on_round=on_round)
    return config, start, rounds, tuned


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Tuning the reward on the generator's samples", "",
             f"`{result['command']}` ({result['machine']}, {result['elapsed_s']:.0f} s).", "",
             "Checker accuracy of each generator's samples (train prompts) along ascent on "
             "the reward of that round, before the round's tuning:", "",
             "| round | generator | " + " | ".join(f"step {a}" for a in result["ascent"])
             + " |", "|---|---|" + "---|" * len(result["ascent"])]
    for r in result["rounds"]:
        for name, along in zip(result["generators"], r.get(
                "per_generator", [r["checker_accuracy_along_ascent"]])):
            lines.append(f"| {r['round']} | {name} | " + " | ".join(
                f"{along[str(a)]:.3f}" for a in result["ascent"]) + " |")
    kinds = list(result["pairwise_before"])
    lines += ["", "Held-out pairwise accuracy (true caption over each hard negative, 2 renders "
              "per prompt):", "",
              "| reward | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    rows = [(f"start ({result['start']})", result["pairwise_before"])] + [
        (f"after round {r['round']}", r["pairwise_after"]) for r in result["rounds"]]
    for name, acc in rows:
        lines.append(f"| {name} | " + " | ".join(f"{acc[k]:.4f}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default="", help="the shapes-world cache to start "
                        "from (default: the config's; the shipped models are copied into it)")
    parser.add_argument("--cache-out", required=True,
                        help="where the copy of the cache with the tuned reward goes")
    parser.add_argument("--tiny", action="store_true", help="the :tiny world (smoke run)")
    parser.add_argument("--from-tuned", action="store_true",
                        help="start from the world's tuned reward (a further stage), not "
                        "from the contrastive one")
    parser.add_argument("--generator-runs", nargs="*", default=[],
                        help="workdirs of training runs on this world: the EMA params of "
                        "each one's newest checkpoint sample every round too")
    from leapalign_jax.toy import reward_tuning

    d = reward_tuning.tuning_config()  # the world build's knobs are the defaults
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--prompts", type=int, default=d.prompts, help="train prompts per round")
    parser.add_argument("--chunk", type=int, default=d.chunk, help="prompts per sampling call")
    parser.add_argument("--ascent", type=int, nargs="+", default=list(d.ascent),
                        help="ascent steps at which each sample is kept (0: the sample)")
    parser.add_argument("--step", type=float, default=d.ascent_step,
                        help="ascent step, in units of the latent RMS")
    parser.add_argument("--steps", type=int, default=d.steps, help="tuning steps per round")
    parser.add_argument("--batch", type=int, default=d.batch, help="contrastive batch")
    parser.add_argument("--rank-batch", type=int, default=d.rank_batch,
                        help="captions per step")
    parser.add_argument("--ranking-weight", type=float, default=d.ranking_weight)
    parser.add_argument("--anchor-weight", type=float, default=d.anchor_weight,
                        help="weight of the squared distance to the starting reward")
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate)
    parser.add_argument("--tune", nargs="+", default=list(d.tune), choices=reward_tuning.PARTS,
                        help="the reward's parts that are tuned")
    parser.add_argument("--seed", type=int, default=0,
                        help="the world build uses config.world.seed (0)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                      "reward_tuning"))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    start = time.time()
    from leapalign_jax import paths
    from leapalign_jax.toy import cache, reward
    from leapalign_jax.toy import world as shapes
    from reward_signal import write_results

    config, start_reward, rounds, tuned = tune(args)
    before = reward.pairwise_accuracy(start_reward)
    after = rounds[-1]["pairwise_after"]
    # The copy holds the tuned reward under the name the config's own tuning knobs give
    # it, so that every benchmark and the main job run on it unchanged.
    wc = config.world
    files = shapes.model_files(wc)
    for kind in ("vae", "reward", "generator"):
        source = paths.join(wc.cache_dir, files[kind])
        if paths.join(args.cache_out, files[kind]) != source:
            paths.write_bytes(paths.join(args.cache_out, files[kind]), paths.read_bytes(source))
    cache.save_params(paths.join(args.cache_out, files["tuned_reward"]), tuned)
    result = {"command": "python benchmarks/reward_tuning.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
              "start": "tuned" if args.from_tuned else "contrastive",
              "generators": ["base"] + list(args.generator_runs),
              "ascent": sorted(set(args.ascent)), "rounds": rounds,
              "pairwise_before": {k: round(v, 4) for k, v in before.items()},
              "pairwise_after": after,
              "elapsed_s": round(time.time() - start, 1)}
    write_results(args.out, "reward_tuning", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
