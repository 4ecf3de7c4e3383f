"""Does the shapes world's generator read word order? Position and binding, swap by swap.

    python benchmarks/prompt_order.py --out benchmarks/results/prompt_order   # ~2 minutes
    python benchmarks/prompt_order.py --runs runs/toy ...   # trained generators beside base
    python benchmarks/prompt_order.py --tiny --cache-dir DIR                 # smoke run

Two categories ask for word order: position ("a red circle above a blue square") and
color_attr ("a red circle and a blue square", colours bound to shapes). Each prompt P has a
swap P' that no image can satisfy together with P: the opposite relation, or the two
colours exchanged. This script measures, per category:

- **In the conditioning**: how much the generator's frozen text features (token sequence
  "txt" and pooled "y") change under the swap, relative to their norm, against a change of
  one colour word. A swap that barely moves them leaves the transformer little to read.
- **In the images**: `--samples` images of each of `--prompts` prompts from P and, with the
  same noises, from P'; how often an image satisfies the prompt it was asked for and how
  often the swapped one (the exact checker judges). The *order effect* is the first minus
  the second, averaged over both directions: 0 for a generator that draws the same
  relations and bindings whatever the order, up to the "either" rate (objects right,
  order ignored) for one that always follows it.

Writes `--out`/prompt_order.md and prompt_order.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reward_signal import judge, shapes_world, world_parser, write_results  # noqa: E402

CATEGORIES = ("position", "color_attr")


def swapped(prompt):
    """P': the opposite relation (position) or the colours exchanged (color_attr)."""
    from leapalign_jax.toy import prompts

    if prompt.category == "position":
        return dataclasses.replace(prompt, relation=prompts.OPPOSITE[prompt.relation])
    if prompt.category == "color_attr":
        (c0, s0), (c1, s1) = prompt.objects
        return dataclasses.replace(prompt, objects=((c1, s0), (c0, s1)))
    raise ValueError(f"no order swap for category {prompt.category!r}")


def recoloured(prompt):
    """The same prompt with its first object's colour replaced by another palette colour
    (still a valid prompt of its category): the one-word change to compare a swap with."""
    from leapalign_jax.toy import prompts

    return next(q for kind, q in prompts.hard_negatives(prompt) if kind == "color")


def chosen_prompts(category: str, n: int, seed: int) -> list:
    """`n` prompts of `category` (train and held-out alike: this is not a score)."""
    from leapalign_jax.toy import prompts

    group = [p for p in prompts.all_prompts() if p.category == category]
    order = np.random.default_rng(seed).permutation(len(group))
    return [group[i] for i in order[:min(n, len(group))]]


def relative_change(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over prompts of |a - b| / |a| (each prompt's features flattened)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean(np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)))


def conditioning(batch_of, group: list) -> dict[str, float]:
    """Relative change of "txt" and "y" under the swap and under one colour word."""
    base, swap, word = (batch_of(ps)["cond"] for ps in (
        group, [swapped(p) for p in group], [recoloured(p) for p in group]))
    return {f"{key}_{name}": round(relative_change(np.asarray(base[key]),
                                                   np.asarray(other[key])), 4)
            for key in ("txt", "y") for name, other in (("swap", swap), ("word", word))}


def images_follow_order(sample, params, batch_of, group: list, samples: int,
                        seed: int) -> dict[str, float]:
    """Checker rates of P and P' for images asked for P and, same noises, for P'."""
    import jax

    specs = [p for p in group for _ in range(samples)]
    swaps = [swapped(p) for p in specs]
    key = jax.random.key(seed)
    asked_p = np.asarray(sample(params, batch_of(specs), key))
    asked_swap = np.asarray(sample(params, batch_of(swaps), key))
    rates = {"asked_P_sat_P": judge(asked_p, specs).mean(),
             "asked_P_sat_swap": judge(asked_p, swaps).mean(),
             "asked_swap_sat_swap": judge(asked_swap, swaps).mean(),
             "asked_swap_sat_P": judge(asked_swap, specs).mean()}
    rates["order_effect"] = 0.5 * (rates["asked_P_sat_P"] - rates["asked_P_sat_swap"]
                                   + rates["asked_swap_sat_swap"] - rates["asked_swap_sat_P"])
    rates["either"] = 0.5 * (rates["asked_P_sat_P"] + rates["asked_P_sat_swap"]
                             + rates["asked_swap_sat_swap"] + rates["asked_swap_sat_P"])
    return {k: round(float(v), 4) for k, v in rates.items()}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from leapalign_jax import flow, paths, sampling, tasks

    config, world, batch_of = shapes_world(args.tiny, args.cache_dir)
    pipe, frozen, wc = world.pipe, world.frozen, config.world
    sample_fn = sampling.make_sample_fn(pipe, flow.flux_sigmas(wc.eval_steps,
                                                               pipe.latent_shape[0]))
    sample = jax.jit(lambda params, batch, key: sample_fn(params, frozen, batch, key))
    groups = {c: chosen_prompts(c, args.prompts, wc.seed) for c in CATEGORIES}
    result: dict[str, Any] = {
        "prompts": {c: len(g) for c, g in groups.items()}, "samples": args.samples,
        "conditioning": {c: conditioning(batch_of, g) for c, g in groups.items()},
        "generators": {}}
    for run in ["base"] + list(args.runs):
        if run == "base":
            params, step = world.params, 0
        else:
            if not paths.isdir(paths.join(run, "checkpoints")):  # gs:// too
                raise SystemExit(f"--runs {run}: no checkpoints/ folder there; pass the "
                                 "workdir of a shapes-world training run")
            params, step = tasks.latest_params(config, run, world)
        result["generators"][run] = {"step": int(step), **{
            c: images_follow_order(sample, params, batch_of, g, args.samples, wc.seed + 3000)
            for c, g in groups.items()}}
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Does the generator read word order?", "",
             f"`{result['command']}` on {result['machine']}, {result['elapsed_s']:.0f} s.", "",
             "Swap P -> P': position, the opposite relation; color_attr, the two colours "
             "exchanged. Relative change of the generator's frozen text features (|f(P') - "
             "f(P)| / |f(P)|, mean over prompts) against a change of one colour word:", "",
             "| category | prompts | txt: swap | txt: one colour word | y: swap | "
             "y: one colour word |", "|---|---:|---:|---:|---:|---:|"]
    for c, f in result["conditioning"].items():
        lines.append(f"| {c} | {result['prompts'][c]} | {f['txt_swap']:.3f} | "
                     f"{f['txt_word']:.3f} | {f['y_swap']:.3f} | {f['y_word']:.3f} |")
    lines += ["", f"Images ({result['samples']} per prompt, the same noises for P and P'), "
              "checker rates; order effect = rate of the asked prompt minus rate of its swap "
              "(mean of both directions), either = objects right with the order ignored:", "",
              "| generator | step | category | asked P: P | asked P: P' | asked P': P' | "
              "asked P': P | order effect | either |", "|---|---:|---|---:|---:|---:|---:|---:|"
              "---:|"]
    for run, g in result["generators"].items():
        for c in CATEGORIES:
            r = g[c]
            lines.append(f"| {run} | {g['step']} | {c} | {r['asked_P_sat_P']:.3f} | "
                         f"{r['asked_P_sat_swap']:.3f} | {r['asked_swap_sat_swap']:.3f} | "
                         f"{r['asked_swap_sat_P']:.3f} | {r['order_effect']:+.3f} | "
                         f"{r['either']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = world_parser(__doc__)
    parser.add_argument("--prompts", type=int, default=64,
                        help="prompts per category (default 64)")
    parser.add_argument("--samples", type=int, default=4,
                        help="images per prompt and per order (default 4)")
    parser.add_argument("--runs", nargs="*", default=[],
                        help="training workdirs whose newest EMA params are measured too")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                      "prompt_order"))
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.samples < 1:
        parser.error("--prompts and --samples must be >= 1")
    start = time.time()
    result = {"command": "python benchmarks/prompt_order.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
              **measure(args)}
    result["elapsed_s"] = round(time.time() - start, 1)
    write_results(args.out, "prompt_order", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
