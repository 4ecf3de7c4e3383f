"""Forward time of one FLUX.1-dev-sized DoubleStreamBlock (hidden 3072, 24 heads).

    python benchmarks/flux_block_speed.py [--img 1024] [--txt 512] [--runs 3] [--dtype float32]

Prints one line: median wall time of the jitted forward after compilation, and the
achieved GFLOP/s (matmul FLOPs counted analytically).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from leapalign_jax.models.flux import FLUX_DEV, DoubleStreamBlock, embed_nd  # noqa: E402


def block_flops(hidden: int, mlp: int, img: int, txt: int) -> float:
    """Matmul FLOPs of one double block forward (modulation excluded: O(hidden^2))."""
    per_token = 2 * (3 * hidden * hidden + hidden * hidden + 2 * hidden * mlp)
    attn = 2 * 2 * (img + txt) ** 2 * hidden  # q k^T and probs v
    return per_token * (img + txt) + attn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img", type=int, default=1024, help="image tokens")
    parser.add_argument("--txt", type=int, default=512, help="text tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="timed runs after compilation")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    config = dataclasses.replace(FLUX_DEV, dtype=args.dtype)
    block = DoubleStreamBlock(config)
    keys = jax.random.split(jax.random.key(0), 3)
    dt = config.compute_dtype
    img = jax.random.normal(keys[0], (args.batch, args.img, config.hidden_size), dt)
    txt = jax.random.normal(keys[1], (args.batch, args.txt, config.hidden_size), dt)
    vec = jax.random.normal(keys[2], (args.batch, config.hidden_size), dt)
    side = int(np.ceil(np.sqrt(args.img)))
    img_ids = np.stack([np.zeros(args.img), np.arange(args.img) // side,
                        np.arange(args.img) % side], -1)
    ids = np.concatenate([np.zeros((args.txt, 3)), img_ids])[None].repeat(args.batch, 0)
    pe = embed_nd(jnp.asarray(ids, jnp.float32), config.axes_dim, config.theta)

    params = jax.jit(block.init)(jax.random.key(1), img, txt, vec, pe)
    forward = jax.jit(block.apply)
    start = time.perf_counter()
    jax.block_until_ready(forward(params, img, txt, vec, pe))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        jax.block_until_ready(forward(params, img, txt, vec, pe))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    flops = args.batch * block_flops(config.hidden_size, config.mlp_hidden_dim, args.img, args.txt)
    print(f"DoubleStreamBlock hidden={config.hidden_size} heads={config.num_heads} "
          f"img={args.img} txt={args.txt} batch={args.batch} {args.dtype} on "
          f"{jax.devices()[0].platform}: median {median * 1e3:.0f} ms over {args.runs} runs "
          f"(first call incl. compile {compile_s:.1f} s, {flops / median / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
