"""VAE decode time: our jitted Flax decoder vs diffusers' torch AutoencoderKL, same weights.

    python benchmarks/vae_speed.py [--widths 64 128 256 256] [--latent 32] [--batch 1]
                                   [--runs 3] [--grad] [--dtype float32]

Builds one random mid-size AutoencoderKL in torch (16 latent channels), saves it in the
diffusers layout, loads it with our loader, checks that both decode the same latent to the
same image, then prints the median wall time of each after a warm-up call, and the ratio.
`--grad` times the decoder's gradient w.r.t. the latent (the reward path) instead.
Needs torch and diffusers (the test requirements).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from leapalign_jax.models.autoencoder import AutoencoderKL  # noqa: E402
from leapalign_jax.weights.autoencoder import load_autoencoder  # noqa: E402


def median_time(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """(first call seconds, median of `runs` later calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 256])
    parser.add_argument("--latent", type=int, default=32, help="latent side (image = x8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="timed runs after warm-up")
    parser.add_argument("--grad", action="store_true", help="time d sum(decode(z) * w) / dz")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    try:
        import diffusers
        import torch
    except ImportError as err:
        raise SystemExit(f"vae_speed.py needs torch and diffusers ({err}); "
                         "pip install -r requirements-test.txt") from err

    n = len(args.widths)
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        block_out_channels=tuple(args.widths), layers_per_block=2, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        use_quant_conv=False, use_post_quant_conv=False).eval()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        config, params = load_autoencoder(folder)
    config = dataclasses.replace(config, dtype=args.dtype)
    ours = AutoencoderKL(config)

    rng = np.random.default_rng(0)
    z = rng.normal(size=(args.batch, 16, args.latent, args.latent)).astype(np.float32)
    side = args.latent * config.downsample_factor
    w = rng.normal(size=(args.batch, side, side, 3)).astype(np.float32)
    z_nhwc, params = jnp.asarray(z.transpose(0, 2, 3, 1)), jax.device_put(params)
    zt, wt = torch.from_numpy(z), torch.from_numpy(w.transpose(0, 3, 1, 2).copy())

    decode = jax.jit(lambda p, z: ours.apply({"params": p}, z, method="decode"))
    if args.grad:
        def loss(p, z):
            return jnp.sum(ours.apply({"params": p}, z, method="decode") * w)
        grad = jax.jit(jax.grad(loss, argnums=1))
        jax_fn = lambda: jax.block_until_ready(grad(params, z_nhwc))  # noqa: E731

        def torch_fn():
            zg = zt.clone().requires_grad_(True)
            (model.decode(zg).sample * wt).sum().backward()
            return zg.grad
    else:
        jax_fn = lambda: jax.block_until_ready(decode(params, z_nhwc))  # noqa: E731

        def torch_fn():
            with torch.no_grad():
                return model.decode(zt).sample

    # Same image from both (sanity check of the comparison).
    ref = np.asarray(torch_fn()).transpose(0, 2, 3, 1) if not args.grad else None
    if ref is not None:
        out = np.asarray(decode(params, z_nhwc))
        err = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
        print(f"decode relative error vs torch: {err:.1e}")

    jax_first, jax_median = median_time(jax_fn, args.runs)
    torch_first, torch_median = median_time(torch_fn, args.runs)
    what = "decoder gradient" if args.grad else "decode"
    print(f"{what} widths={args.widths} latent=16x{args.latent}x{args.latent} -> {side}x{side} "
          f"batch={args.batch} {args.dtype}, median of {args.runs} after warm-up:")
    print(f"  flax/jax ({jax.devices()[0].platform}): {jax_median * 1e3:.0f} ms "
          f"(first call incl. compile {jax_first:.1f} s)")
    print(f"  diffusers/torch (cpu, {torch.get_num_threads()} threads): "
          f"{torch_median * 1e3:.0f} ms (first call {torch_first:.1f} s)")
    print(f"  ratio torch / jax: {torch_median / jax_median:.2f}")


if __name__ == "__main__":
    main()
