"""Backward cost of AlignProp's truncation: value_and_grad at K' = 1 vs K' = T.

    python benchmarks/alignprop_truncation.py [--steps 25] [--batch 8] [--runs 7]

A shapes-world-sized Flux (hidden 128, 4 heads, 2 double + 2 single blocks, 16 latent
tokens of 16 channels, 8 text tokens) rolls out T Euler steps through the gradient-carrying
chain `euler_chain`, whose gradient runs through the last K' steps only. K' is a traced
argument, so one compiled function serves every K' (as in training, where K' is drawn per
batch). Prints the median wall time of the jitted value_and_grad after compilation for
K' = 1 and K' = T, of the untruncated chain (no `grad_from`), and of the forward rollout
alone (no gradient) for scale. Every chain rematerialises its steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from leapalign_jax import flow  # noqa: E402
from leapalign_jax.models.flux import Flux, FluxConfig, init_params  # noqa: E402

TOKENS_HW, CHANNELS, TXT_LEN, TXT_DIM = 4, 16, 8, 64


def chain_fn():
    """`flow.euler_chain`, or where it lived before (`methods.alignprop`)."""
    if hasattr(flow, "euler_chain"):
        return flow.euler_chain
    from leapalign_jax.methods import alignprop
    return alignprop.euler_chain


def timed(fn, *args, runs: int) -> tuple[float, float]:
    """(compile + first call seconds, median seconds of `runs` further calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="Euler steps T")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=7, help="timed calls after compilation")
    args = parser.parse_args()

    config = FluxConfig(in_channels=CHANNELS, vec_in_dim=TXT_DIM, context_in_dim=TXT_DIM,
                        hidden_size=128, num_heads=4, axes_dim=(4, 14, 14), depth=2,
                        depth_single_blocks=2, guidance_embed=False)
    model = Flux(config)
    params = init_params(config, jax.random.key(0))
    b, n = args.batch, TOKENS_HW * TOKENS_HW
    rs = np.random.default_rng(0)
    txt = jnp.asarray(rs.standard_normal((b, TXT_LEN, TXT_DIM)), jnp.float32)
    y = jnp.asarray(rs.standard_normal((b, TXT_DIM)), jnp.float32)
    img_ids = jnp.broadcast_to(flow.image_ids(TOKENS_HW, TOKENS_HW), (b, n, 3))
    txt_ids = jnp.broadcast_to(flow.text_ids(TXT_LEN), (b, TXT_LEN, 3))
    x0 = jax.random.normal(jax.random.key(1), (b, n, CHANNELS))
    sigmas = flow.flux_sigmas(args.steps, n)
    num_steps = args.steps

    def velocity(p, x, s):
        return model.apply({"params": p}, x, img_ids, txt, txt_ids, s, y)

    chain = chain_fn()

    def loss(p, k):
        x = chain(velocity, p, x0, sigmas, remat=True, grad_from=num_steps - k)
        return jnp.mean(x ** 2)

    grad = jax.jit(jax.value_and_grad(loss))
    full = jax.jit(jax.value_and_grad(
        lambda p: jnp.mean(chain(velocity, p, x0, sigmas, remat=True) ** 2)))
    forward = jax.jit(lambda p: flow.sample(velocity, p, x0, sigmas))
    print(f"devices={jax.devices()} T={num_steps} batch={b} runs={args.runs}")
    _, t_fwd = timed(forward, params, runs=args.runs)
    print(f"forward rollout (no gradient): {t_fwd * 1e3:8.1f} ms")
    results = {}
    for k in (1, num_steps):
        first, med = timed(grad, params, jnp.int32(k), runs=args.runs)
        results[k] = med
        print(f"value_and_grad K'={k:3d}: {med * 1e3:8.1f} ms  (first call {first:.1f} s)")
    _, t_full = timed(full, params, runs=args.runs)
    print(f"value_and_grad untruncated: {t_full * 1e3:8.1f} ms")
    print(f"ratio K'=1 / K'=T: {results[1] / results[num_steps]:.2f}")


if __name__ == "__main__":
    main()
