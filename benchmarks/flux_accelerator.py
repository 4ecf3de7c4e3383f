"""LeapAlign's train step and the rollout at FLUX.1-dev width on one accelerator.

    python benchmarks/flux_accelerator.py                 # GPU/TPU: hidden 3072, 2+4 blocks
    python benchmarks/flux_accelerator.py --depth 19 --single 38 --batch 1   # full depth
    python benchmarks/flux_accelerator.py --tiny          # CPU smoke test, seconds
    python benchmarks/flux_accelerator.py --method alignprop --no-torch   # another method
    python benchmarks/flux_accelerator.py --depth 19 --single 38 --lora-rank 64 \
        --scan-blocks --resolution 720 --no-torch   # FLUX.1-dev's full depth, LoRA (one H100)

A Flux of FLUX.1-dev's width (hidden 3072, 24 heads, head dim 128, T5/CLIP input widths)
with fewer blocks (default 2 double + 4 single, ~1.25B params), at 512x512 (32x32 = 1024
latent tokens, 512 text tokens), bfloat16 compute with float32 params, T = 25, trained by
the trainer's own LeapAlign step (`train.make_train_step`, state donated) on the random_flux
world's identity-like decoder and reward (`plan.standin_decode`, no VAE or reward model).
`--method` trains another method's step on the same model instead (one method per process,
so the peak memory is that method's own). `--lora-rank r` trains rank-r adapters (alpha r)
of every attention and MLP kernel with the base frozen in bfloat16, as
`configs/flux_dev.py:lora` does, which is how FLUX.1-dev's full depth fits one GPU; the base
is random (normal, std 0.02; norm scales 1), which costs the same time as real weights.

Prints, one `key: value` per line:

- s/iter of the train step (median after compilation), its FLOPs per iteration (the matmul
  FLOPs of its jaxpr, loops times their trips and remat's recomputation included, as
  `leapalign_jax.plan` counts them), achieved TFLOP/s and MFU against the chip's bf16 dense
  peak (recomputation counted, so a hardware utilisation); `--flops-only` prints the FLOPs
  from shapes alone, on any host;
- peak device memory (`memory_stats()['peak_bytes_in_use']`) and the compiled temp bytes;
- rollout throughput (images/s of the T-step Euler sampler, no gradient) of our jitted
  sampler against a FluxPipeline-style torch loop over diffusers' `FluxTransformer2DModel`
  of the same architecture on the same GPU (skipped, with a message, without torch+CUDA).
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
from leapalign_jax import flow, plan, train  # noqa: E402
from leapalign_jax.config_lib import base_config  # noqa: E402
from leapalign_jax.models import lora  # noqa: E402
from leapalign_jax.models.flux import (FLUX_DEV, Flux, FluxConfig, abstract_params,  # noqa: E402
                                       init_params)
from leapalign_jax.pipeline import Pipeline, World  # noqa: E402
from leapalign_jax.world import flux_velocity, with_lora  # noqa: E402

TINY = FluxConfig(in_channels=16, vec_in_dim=16, context_in_dim=32, hidden_size=32,
                  num_heads=2, axes_dim=(4, 6, 6), depth=1, depth_single_blocks=1)


def peak_flops(device) -> float | None:
    """bf16 dense peak of the device (FLOP/s), or None when it is not a known chip."""
    kind = device.device_kind.lower()
    for name, key in (("h100", "h100"), ("h200", "h200"), ("v5p", "v5p"), ("v5 p", "v5p"),
                      ("v6", "v6e"), ("trillium", "v6e")):
        if name in kind:
            return plan.CHIPS[key].peak_flops
    return None


def random_base(shapes: dict, dtype=jnp.bfloat16) -> dict:
    """Random params of the shapes' structure, made leaf by leaf in `dtype`, so a 12B base
    never exists in float32 on the device (48 GB, beside the 24 GB bfloat16 copy)."""
    leaves, treedef = jax.tree.flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return jax.tree.unflatten(treedef, [
        jnp.ones(x.shape, dtype) if path[-1].key == "scale"  # norm scales
        else (0.02 * jax.random.normal(k, x.shape)).astype(dtype)
        for (path, x), k in zip(leaves, keys)])


def timed(fn, runs: int) -> tuple[float, float]:
    """(first call seconds, median seconds of `runs` further calls); fn blocks."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def torch_rollout(mc: FluxConfig, side: int, text_len: int, batch: int, sigmas: np.ndarray,
                  runs: int, dtype: str, device: str) -> float:
    """Seconds per T-step rollout of a FluxPipeline-style loop (the diffusers transformer
    called once per Euler step, `x += (sigma_next - sigma) v`), median of `runs`."""
    import torch
    from diffusers import FluxTransformer2DModel

    from leapalign_jax.weights.flux import diffusers_config

    cfg = {k: v for k, v in diffusers_config(mc).items() if not k.startswith("_")}
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = FluxTransformer2DModel(**cfg).to(device=device, dtype=tdtype).eval()
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(batch, side * side, mc.in_channels, generator=g).to(device, tdtype)
    txt = torch.randn(batch, text_len, mc.context_in_dim, generator=g).to(device, tdtype)
    y = torch.randn(batch, mc.vec_in_dim, generator=g).to(device, tdtype)
    img_ids = torch.from_numpy(flow.image_ids(side, side)).to(device)
    txt_ids = torch.from_numpy(flow.text_ids(text_len)).to(device)
    guidance = torch.full((batch,), 3.5, device=device, dtype=torch.float32)

    def rollout():
        x = x0
        with torch.no_grad():
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                t = torch.full((batch,), float(s), device=device, dtype=tdtype)
                v = model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=y,
                          timestep=t, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                          return_dict=False)[0]
                x = x + (float(s_next) - float(s)) * v
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    return timed(rollout, runs)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels")
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25, help="Euler steps T")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots_saveable"])
    parser.add_argument("--runs", type=int, default=3, help="timed calls after compilation")
    parser.add_argument("--method", default="leapalign",
                        choices=["leapalign", "refl", "drtune", "draft_lv", "alignprop"],
                        help="the method whose train step is timed (its default knobs)")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="train rank-r LoRA adapters, the base frozen in bfloat16 (0: all)")
    parser.add_argument("--scan-blocks", action="store_true",
                        help="one nn.scan per block kind (XLA compiles one block of each)")
    parser.add_argument("--flops-only", action="store_true",
                        help="trace the step from shapes and print its FLOPs (any host)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch rollout")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny model at 64x64 pixels, T=2, on any backend (smoke test)")
    args = parser.parse_args()

    if args.tiny:
        mc = dataclasses.replace(TINY, dtype=args.dtype, remat=args.remat,
                                 scan_blocks=args.scan_blocks)
        args.resolution, args.text_len, args.steps, args.batch, args.runs = 64, 8, 2, 2, 1
    else:
        mc = dataclasses.replace(FLUX_DEV, depth=args.depth, depth_single_blocks=args.single,
                                 dtype=args.dtype, remat=args.remat,
                                 scan_blocks=args.scan_blocks)
    side = args.resolution // 16  # VAE /8, then 2x2 patches
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} (x{jax.device_count()})")
    print(f"method: {args.method}")
    print(f"model: Flux {mc.depth}+{mc.depth_single_blocks} blocks, hidden {mc.hidden_size}, "
          f"{mc.num_heads} heads, {mc.dtype}, remat {mc.remat}, scan_blocks {mc.scan_blocks}; "
          f"{side * side} image + "
          f"{args.text_len} text tokens, T={args.steps}, batch {args.batch}")

    sigmas = flow.flux_sigmas(args.steps, side * side)
    pipe = Pipeline(
        velocity=flux_velocity(Flux(mc), flow.image_ids(side, side),
                               flow.text_ids(args.text_len), 3.5 if mc.guidance_embed else None),
        decode=plan.standin_decode, reward=plan.standin_reward, sigmas=sigmas,
        latent_shape=(side * side, mc.in_channels))
    config = base_config(args.method)
    config.method.hinge_lambda = 1.0  # the stand-in reward lies in (-1, 1)
    optimizer = train.make_optimizer(config.optim)
    frozen, assemble = {}, None
    axes = abstract_params(mc)
    shapes = plan._unbox(axes)  # ShapeDtypeStructs
    if args.lora_rank:
        base = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), shapes)
                if args.flops_only else random_base(shapes))
        world = with_lora(
            World(pipe=pipe, params=base, param_axes=axes, frozen={},
                  train_batch=None, eval_batch=None, fingerprint={}, model=mc),
            lora.lora_config(rank=args.lora_rank, alpha=float(args.lora_rank)), seed=0)
        params, frozen, assemble = world.params, world.frozen, world.assemble
        n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
        print(f"frozen_base_params: {n_base} ({n_base / 1e9:.3f}B, bfloat16)")
    elif args.flops_only:
        params = shapes
    else:
        params = init_params(mc, jax.random.key(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"params: {n_params} ({n_params / 1e9:.3f}B" +
          (", LoRA adapters)" if args.lora_rank else ")"))
    create = lambda p: train.create_train_state(p, optimizer, 0)  # noqa: E731
    # params donated: the device then holds the state alone, so the peak is the step's own.
    state = (jax.eval_shape(create, params) if args.flops_only
             else jax.jit(create, donate_argnums=(0,))(params))
    del params
    rs = np.random.default_rng(0)
    batch = {"cond": {
        "txt": jnp.asarray(rs.standard_normal((args.batch, args.text_len, mc.context_in_dim)),
                           jnp.float32),
        "y": jnp.asarray(rs.standard_normal((args.batch, mc.vec_in_dim)), jnp.float32)},
        "prompt_id": jnp.arange(args.batch, dtype=jnp.int32)}

    step = jax.jit(train.make_train_step(pipe, config.method, optimizer, config.optim.ema_decay,
                                         config.optim.grad_clip, assemble),
                   donate_argnums=(0,))
    t0 = time.perf_counter()
    traced = step.trace(state, frozen, batch)
    # The matmul FLOPs the step executes, from its jaxpr: loop bodies times their trips and
    # remat's recomputation included. XLA's cost_analysis is no substitute on GPU, where it
    # leaves the library calls (cuBLAS GEMMs) out.
    flops, _, _ = plan.matmul_flops(traced.jaxpr)
    print(f"train_flops_per_iter: {flops:.4e}")
    if args.flops_only:
        return
    compiled = traced.lower().compile()
    print(f"compile_s: {time.perf_counter() - t0:.1f}")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    print(f"xla_cost_analysis_flops: {float(cost.get('flops', 0.0)):.4e} (loop bodies once)")
    temp = compiled.memory_analysis().temp_size_in_bytes

    holder = {"state": state}

    def train_once():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        jax.block_until_ready(metrics)

    _, s_iter = timed(train_once, args.runs)
    tflops = flops / s_iter / 1e12
    peak = peak_flops(device)
    print(f"train_s_per_iter: {s_iter:.4f}")
    print(f"train_tflops_per_s: {tflops:.2f}")
    print("train_mfu: " + (f"{tflops * 1e12 / peak:.3f} (peak {peak / 1e12:.0f} TFLOP/s bf16)"
                           if peak else "n/a (no known peak for this device)"))
    print(f"compiled_temp_gib: {temp / 2 ** 30:.3f}")
    stats = device.memory_stats() or {}
    print("peak_hbm_gib: " + (f"{stats['peak_bytes_in_use'] / 2 ** 30:.3f}"
                              if "peak_bytes_in_use" in stats else "n/a (no memory_stats)"))

    x0 = jax.random.normal(jax.random.key(1), (args.batch, side * side, mc.in_channels))
    # frozen is an argument, not a closure: a closed-over base would become a constant.
    sample = jax.jit(lambda p, fr, x: flow.sample(
        lambda q, xx, s: pipe.velocity(q, xx, s, batch["cond"]),
        assemble(p, fr) if assemble else p, x, sigmas))
    _, s_roll = timed(
        lambda: jax.block_until_ready(sample(holder["state"].params, frozen, x0)), args.runs)
    print(f"jax_rollout_images_per_s: {args.batch / s_roll:.3f}")

    torch_device = None
    if not args.no_torch and not args.lora_rank:
        try:
            import torch
            if torch.cuda.is_available():
                torch_device = "cuda"
            elif args.tiny:
                torch_device = "cpu"  # the smoke test exercises the torch loop on CPU
        except ImportError:
            pass
    if torch_device is None:
        print("torch_rollout: skipped (--no-torch, --lora-rank, or no torch with CUDA)")
        return
    try:
        s_torch = torch_rollout(mc, side, args.text_len, args.batch, sigmas, args.runs,
                                args.dtype, torch_device)
    except ImportError as e:
        print(f"torch_rollout: skipped ({e})")
        return
    print(f"torch_rollout_images_per_s: {args.batch / s_torch:.3f} ({torch_device})")
    print(f"rollout_speed_jax_over_torch: {s_torch / s_roll:.2f}")


if __name__ == "__main__":
    main()
