"""Compile time of the LoRA train step at FLUX.1-dev depth: unrolled blocks vs `scan_blocks`.

    python benchmarks/scan_compile.py [--hidden 128] [--blocks 1x2 2x4 4x8 19x38]
        [--unrolled-up-to 12] [--steps 25] [--runs 3] [--out benchmarks/results/scan_compile]

FLUX.1-dev has 19 double and 38 single blocks. Unrolled, XLA compiles each of them in the
rollout, both leaps and their backward pass; with `world.model.scan_blocks` (`nn.scan`
per block kind) it compiles one of each. This builds the random_flux world at several
depths up to FLUX.1-dev's (narrow, so it runs on a CPU), trains rank-4 LoRA adapters of
every attention and MLP kernel (the `:lora` targets) with full block remat, and for each
layout times tracing + lowering, XLA compilation, and the compiled step (median of
`--runs`). The unrolled layout is timed only up to `--unrolled-up-to` blocks (its compile
grows with depth). Both layouts start from the same weights (the stacked ones are
`stack_blocks` of the per-block ones), so their first losses must agree; the script
checks that they do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from leapalign_jax import config_lib, parallel, plan, train  # noqa: E402
from leapalign_jax.models.flux import stack_blocks  # noqa: E402
from leapalign_jax.world import build_world  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(args: argparse.Namespace, method: str, scan: bool):
    config = config_lib.load_config(os.path.join(ROOT, "configs", f"random_flux.py:{method}"))
    heads = args.hidden // 64
    config.world.model.update(dict(
        hidden_size=args.hidden, num_heads=heads, depth=args.depth,
        depth_single_blocks=args.single, mlp_ratio=4.0, axes_dim=(8, 28, 28),
        remat=args.remat, scan_blocks=scan))
    config.world.update(dict(latent_hw=args.latent_hw, text_len=args.text_len,
                             num_steps=args.steps))
    config.train.batch_size = args.batch
    config.lora.update(dict(enabled=True, rank=4, alpha=4.0))
    return config


def time_layout(args, method: str, scan: bool, like=None) -> tuple[dict, tuple]:
    """Trace/lower, compile and run one layout's train step; returns the timings and the
    (config, adapters, base) it started from, on the host (the step donates its state)."""
    config = make_config(args, method, scan)
    world = build_world(config)
    if like is not None:  # the per-block world's weights, stacked
        mc, adapters, base = like
        world = dataclasses.replace(world, params=stack_blocks(adapters, mc),
                                    frozen=dict(world.frozen, base=stack_blocks(base, mc)))
    start = (world.model, *jax.device_get((world.params, world.frozen["base"])))
    mesh = parallel.make_mesh(config.mesh.shape)
    batch = world.train_batch(0)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                            batch)
    step_fn, (_, (state_sh, frozen_sh, batch_sh)) = plan.jit_train_step(
        config, world, mesh, parallel.DEFAULT_RULES, abstract)
    optimizer = train.make_optimizer(config.optim)
    frozen = dict(world.frozen)
    t0 = time.perf_counter()
    lowered = step_fn.lower(jax.eval_shape(
        lambda p: train.create_train_state(p, optimizer, config.seed), world.params),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen), abstract)
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0 - t_lower
    losses, times = [], []
    state = jax.device_put(train.create_train_state(world.params, optimizer, config.seed),
                           state_sh)
    frozen = jax.device_put(frozen, frozen_sh)
    for i in range(args.runs + 1):
        batch_i = jax.device_put(world.train_batch(i), batch_sh)
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch_i)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t0)
    return {"layout": "scan_blocks" if scan else "unrolled", "lower_s": t_lower,
            "compile_s": t_compile, "step_s": statistics.median(times[1:]),
            "first_loss": losses[0]}, start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128, help="width (head dim 64)")
    parser.add_argument("--blocks", nargs="+", default=["1x2", "2x4", "4x8", "19x38"],
                        help="double x single block counts to time")
    parser.add_argument("--unrolled-up-to", type=int, default=12,
                        help="time the unrolled layout only up to this many blocks")
    parser.add_argument("--steps", type=int, default=25, help="rollout steps T")
    parser.add_argument("--latent-hw", type=int, default=8, help="image tokens per side")
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--method", default="leapalign")
    parser.add_argument("--runs", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--out", default="", help="folder for scan_compile.{json,md}")
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)  # time real compiles

    rows, t_start = [], time.perf_counter()
    for blocks in args.blocks:
        args.depth, args.single = (int(n) for n in blocks.split("x"))
        start = None
        if args.depth + args.single <= args.unrolled_up_to:
            unrolled, start = time_layout(args, args.method, scan=False)
            rows.append(dict(unrolled, blocks=blocks))
            print(json.dumps(rows[-1]), flush=True)
        scanned, _ = time_layout(args, args.method, scan=True, like=start)
        rows.append(dict(scanned, blocks=blocks))
        print(json.dumps(rows[-1]), flush=True)
        if start is not None:
            gap = abs(scanned["first_loss"] - unrolled["first_loss"])
            if gap > 1e-4 * max(1.0, abs(unrolled["first_loss"])):
                raise SystemExit(f"{blocks}: the layouts' first losses differ by {gap:.3g}")
    elapsed = time.perf_counter() - t_start
    command = "python benchmarks/scan_compile.py " + " ".join(sys.argv[1:])
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
               f"{jax.devices()[0].device_kind}")
    lines = [
        "# LoRA train step: unrolled blocks vs scan_blocks, compile and step time", "",
        f"`{command}` on {machine}, {elapsed:.0f} s in all.", "",
        f"{args.method}, hidden {args.hidden} (head dim 64), {args.latent_hw ** 2} image + "
        f"{args.text_len} text tokens, T = {args.steps}, batch {args.batch}, remat "
        f"{args.remat}, rank-4 LoRA of every attention and MLP kernel. Trace + lower and "
        f"compile: one each (no compilation cache); step: median of {args.runs} after the "
        "first. Where both layouts ran they started from the same weights and their first "
        f"losses agree (checked). Unrolled runs only up to {args.unrolled_up_to} blocks.", "",
        "| blocks (double x single) | layout | trace + lower s | compile s | step s |",
        "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['blocks']} | {r['layout']} | {r['lower_s']:.1f} | "
                     f"{r['compile_s']:.1f} | {r['step_s']:.3f} |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "scan_compile.json"), "w") as f:
            json.dump({"command": command, "machine": machine, "rows": rows,
                       "elapsed_s": elapsed}, f, indent=1)
        with open(os.path.join(args.out, "scan_compile.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
