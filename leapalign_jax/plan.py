"""`task=plan`: per-device memory and time of the real train step, before any weights exist.

The plan compiles the trainer's own step ahead of time from abstract shapes: the params are
`jax.eval_shape` of the Flux init, the batch `ShapeDtypeStruct`s, and the step is
`train.make_train_step` jitted with `train.state_shardings`, the same in/out shardings and
state donation as `train.train_and_evaluate`, then `.lower(...).compile()`. Nothing is
allocated, so a 12B FLUX.1-dev plan runs on a laptop (see `plan.compile_units`). From the compiled executable:

- memory per device: `memory_analysis()` (argument, output, alias and temporary bytes); the
  arguments are split into params, optimizer moments and EMA by their shard shapes;
- FLOPs per iteration per device: `cost_analysis()`, which counts each loop body once (XLA's
  HloCostAnalysis), plus the missing loop trips (the rollout's T - 1 further Euler steps)
  counted from the step's jaxpr (every dot_general, scans times their length);
- time per iteration at a stated MFU on H100 / H200 / TPU v5p / v6e peaks.

Beside them stand analytic terms (params, gradients, Adam moments, EMA, activations under the
remat policy) so a gap between the two is visible and explained in the printed report.

The world of a plan is abstract: a `Pipeline` whose velocity is the Flux model of the config
and whose decoder and reward are the random_flux world's identity-like stand-ins (the first
three channels of each latent token as a pixel, a colour score): their cost is negligible,
so the plan is the generator's alone; the real VAE decoder, reward model and text encoders
of the "flux" world are not in it. The model: for the "flux" world, `world.checkpoint`'s
transformer config (read, not loaded) or FLUX.1-dev, at `world.height` x `world.width`
pixels and `world.max_sequence_length` text tokens; for random_flux-style worlds
`world.model` (or `world.init_weights`' header) at `latent_hw`, `text_len`; `plan.model`
names a preset instead.

A mesh (`config.plan.mesh`, else `config.mesh.shape`) larger than this host is simulated: the
plan re-runs itself in a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=N`
on CPU and reads back its JSON. The report says which backend compiled the numbers. XLA:CPU
does not honour remat in its schedule and runs attention softmax and bf16 matmuls in float32,
so a CPU-compiled temp overstates a TPU/GPU run; `plan.fit_on="analytic"` judges the fit on
the analytic terms instead (benchmarks/results/plan.md measures the gap). A whole FLUX.1-dev
step compiles too slowly on a small CPU host: `plan.compile_units` compiles 1+2 and 2+4 blocks
and extrapolates.

    python -m leapalign_jax.main --config configs/flux_dev.py --workdir /tmp/plan \\
        --config.task=plan --config.plan.mesh="(1, 16, 1)" --config.plan.compile_units=1 \\
        --config.world.remat=full --config.plan.chip=v5p

(`python -m leapalign_jax.plan --config FILE --plan.chip=...` does the same without main.)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from leapalign_jax import flow, methods, parallel, train
from leapalign_jax.models.flux import FLUX_DEV, FLUX_SCHNELL, Flux, FluxConfig, abstract_params
from leapalign_jax.pipeline import Batch, Params, Pipeline, World
from leapalign_jax.world import flux_velocity, with_lora

GIB = 2 ** 30
# XLA options for compiling a step that is analysed, never run (CPU backend only).
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class Chip(NamedTuple):
    """Peak dense bf16 matmul throughput (FLOP/s) and HBM per chip (GiB)."""

    peak_flops: float
    hbm_gib: float


CHIPS: dict[str, Chip] = {
    # NVIDIA H100 SXM5 datasheet: 989 TFLOP/s bf16 dense (1979 with sparsity), 80 GB HBM3.
    "h100": Chip(989e12, 80.0),
    # NVIDIA H200 SXM datasheet: the same 989 TFLOP/s bf16 dense, 141 GB HBM3e.
    "h200": Chip(989e12, 141.0),
    # Cloud TPU v5p system architecture page: 459 TFLOP/s bf16, 95 GiB HBM2e per chip.
    "v5p": Chip(459e12, 95.0),
    # Cloud TPU v6e (Trillium) system architecture page: 918 TFLOP/s bf16, 32 GiB HBM.
    "v6e": Chip(918e12, 32.0),
}

PRESETS: dict[str, FluxConfig] = {"flux-dev": FLUX_DEV, "flux-schnell": FLUX_SCHNELL}


def plan_config() -> ml_collections.ConfigDict:
    """Knobs of `task=plan` (`config.plan`)."""
    c = ml_collections.ConfigDict()
    c.chip = "h100"  # the chip whose HBM the plan must fit: one of CHIPS
    # HBM per chip in GiB; None: the chip's (h100 80, h200 141, v5p 95, v6e 32).
    c.hbm_gib = ml_collections.config_dict.placeholder(float)
    # Share of HBM a run may use (runtime, collectives' buffers and fragmentation take the
    # rest; JAX on GPU preallocates 0.75 unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised).
    c.usable_fraction = 0.9
    c.mfu = 0.4  # model FLOPs utilisation assumed for the iteration time
    # "" = config.world.model; "flux-dev" / "flux-schnell" = FLUX.1's architecture
    # (world.model's dtype and remat still apply). config.world.init_weights, when set, wins.
    c.model = ""
    # (data, fsdp, tensor) of the planned mesh, e.g. "(1, 16, 1)"; None: config.mesh.shape
    # (a list, which command-line flags cannot override).
    c.mesh = ml_collections.config_dict.placeholder(tuple)
    # Devices of the mesh when the shape holds a -1; None: this host's devices.
    c.num_devices = ml_collections.config_dict.placeholder(int)
    # 0: compile the real per-device batch. n > 0: compile per-device batches n and 2n and
    # extrapolate temporaries and FLOPs linearly to the real one (for steps too big to
    # compile at full batch on a small host).
    c.compile_batch_per_device = 0
    # 0: compile the whole model. n > 0: the blocks come in g units of (depth / g double +
    # depth_single_blocks / g single) blocks, g = gcd of the two (FLUX.1: 19 units of 1 + 2);
    # compile models of n and 2n units (full width, tokens, batch and mesh) and extrapolate
    # every compiled number linearly to g units. Compile time grows faster than linearly
    # with the program, so this is how a 12B FLUX.1-dev step is planned on a small CPU host.
    c.compile_units = 0
    c.check_fit = True  # raise ValueError when the step does not fit the chip
    # What the fit is judged on: "compiled" (memory_analysis) or "analytic" (the terms
    # from first principles). XLA:CPU's schedule keeps rematerialised activations alive
    # and computes attention and bf16 matmuls in float32, so a CPU-compiled temp overstates
    # a TPU/GPU run of a remat'd model (benchmarks/results/plan.md).
    c.fit_on = "compiled"
    return c


# ----------------------------------------------------------------------------- the world


class Geometry(NamedTuple):
    """The sizes a plan needs of a world: latent tokens per side, text tokens, steps."""

    height_tokens: int
    width_tokens: int
    text_len: int
    num_steps: int
    guidance: float


def geometry(config: ml_collections.ConfigDict) -> Geometry:
    """The world's token grid, text length, rollout length and guidance.

    The "flux" world gives them as pixels (height / 16: VAE /8 then 2x2 patches) and T5
    tokens; random_flux-style worlds as `latent_hw`, `text_len`.
    """
    wc = config.world
    if wc.name == "flux":
        return Geometry(wc.height // 16, wc.width // 16, wc.max_sequence_length,
                        wc.num_steps, wc.guidance)
    if "model" in wc and "latent_hw" in wc:
        return Geometry(wc.latent_hw, wc.latent_hw, wc.text_len, wc.num_steps,
                        wc.get("guidance", 3.5))
    raise ValueError(f"config.world.name={wc.name!r}: the plan needs a Flux world (flux, or "
                     "one with world.model, latent_hw, text_len such as random_flux)")


def model_config(config: ml_collections.ConfigDict) -> FluxConfig:
    """The Flux architecture of the plan: the checkpoint's header, a preset, or world.model.

    The "flux" world: `world.checkpoint`'s transformer/config.json when it exists, else
    FLUX.1-dev (or `plan.model`), with the world's dtype, remat and scan_blocks.
    """
    wc = config.world
    geometry(config)  # a world the plan knows
    preset = config.get("plan", plan_config()).model
    if preset and preset not in PRESETS:
        raise ValueError(f"config.plan.model={preset!r}: use one of {sorted(PRESETS)} "
                         "or '' for the world's model")
    from leapalign_jax.weights.flux import read_flux_config
    if wc.name == "flux":
        keep = {"dtype": wc.dtype, "remat": wc.remat, "scan_blocks": wc.get("scan_blocks", False)}
        folder = os.path.join(wc.checkpoint, "transformer") if wc.checkpoint else ""
        if folder and os.path.isdir(folder) and not preset:
            return dataclasses.replace(read_flux_config(folder), **keep)
        return dataclasses.replace(PRESETS[preset or "flux-dev"], **keep)
    knobs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in wc.model.to_dict().items()}
    keep = {"dtype": knobs.get("dtype", "float32"), "remat": knobs.get("remat", "none"),
            "scan_blocks": knobs.get("scan_blocks", False)}
    if wc.get("init_weights"):
        axes = None if wc.get("init_axes_dim") is None else tuple(wc.init_axes_dim)
        return dataclasses.replace(read_flux_config(wc.init_weights, axes_dim=axes), **keep)
    if preset:
        return dataclasses.replace(PRESETS[preset], **keep)
    return FluxConfig(**knobs)


def standin_decode(frozen: Params, x: jax.Array) -> jax.Array:
    """Identity-like decoder: the first 3 channels of each latent token as an RGB pixel
    (a square image when the tokens form one, else one column)."""
    del frozen
    side = int(round(x.shape[1] ** 0.5))
    h, w = (side, side) if side * side == x.shape[1] else (x.shape[1], 1)
    return jax.nn.sigmoid(x[..., :3].reshape(x.shape[0], h, w, 3))


def standin_reward(frozen: Params, images: jax.Array, batch: Batch) -> jax.Array:
    """A colour score in (-1, 1), the random_flux world's: negligible cost, full gradient."""
    del frozen, batch
    return jnp.mean(images[..., 0] - 0.5 * (images[..., 1] + images[..., 2]), axis=(1, 2))


def abstract_world(config: ml_collections.ConfigDict, mc: FluxConfig) -> World:
    """A World whose params are shapes only (at `world.param_dtype`), with the Flux velocity
    and stand-in judges; LoRA adapters when `config.lora.enabled`."""
    g = geometry(config)
    seq = g.height_tokens * g.width_tokens
    boxed = abstract_params(mc)
    pipe = Pipeline(
        velocity=flux_velocity(Flux(mc), flow.image_ids(g.height_tokens, g.width_tokens),
                               flow.text_ids(g.text_len),
                               g.guidance if mc.guidance_embed else None),
        decode=standin_decode, reward=standin_reward,
        sigmas=flow.flux_sigmas(g.num_steps, seq), latent_shape=(seq, mc.in_channels))
    dtype = jnp.dtype(config.world.get("param_dtype") or "float32")
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), _unbox(boxed))
    world = World(pipe=pipe, params=params, param_axes=boxed, frozen={}, train_batch=None,
                  eval_batch=None, fingerprint={}, model=mc)
    if config.get("lora") is not None and config.lora.enabled:
        # Adapters trained; the base frozen at world.param_dtype, sharded like params.
        world = with_lora(world, config.lora, config.seed)
    return world


def abstract_batch(mc: FluxConfig, batch: int, text_len: int) -> Batch:
    """The random_flux world's batch layout as ShapeDtypeStructs."""
    f32 = jnp.float32
    return {"cond": {"txt": jax.ShapeDtypeStruct((batch, text_len, mc.context_in_dim), f32),
                     "y": jax.ShapeDtypeStruct((batch, mc.vec_in_dim), f32)},
            "prompt_id": jax.ShapeDtypeStruct((batch,), jnp.int32)}


def _unbox(tree: Any) -> Any:
    import flax.linen as nn
    return nn.meta.unbox(tree)


def _sds(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


# ----------------------------------------------------------------------------- compile


def jit_train_step(config: ml_collections.ConfigDict, world: World, mesh: jax.sharding.Mesh,
                   rules: Any, batch: Batch) -> tuple[Any, tuple]:
    """The trainer's jitted step and its abstract arguments `(state, frozen, batch)`.

    The same construction as `train.train_and_evaluate`: state shardings from the params'
    logical axes, frozen tree replicated except `world.frozen_axes` entries (a LoRA base,
    sharded by its axes), plus the reference params sharded like the params when the
    method reads them, batch leaves split over the data-parallel axes, the state
    donated.
    """
    optimizer = train.make_optimizer(config.optim)
    shardings = train.state_shardings(world, optimizer, mesh, rules)
    state = jax.eval_shape(lambda p: train.create_train_state(p, optimizer, config.seed),
                           world.params)
    frozen = jax.tree.map(_sds, world.frozen)
    frozen_sh = {k: jax.tree.map(lambda _: parallel.replicated(mesh), v)
                 for k, v in frozen.items()}
    for key, logical in (world.frozen_axes or {}).items():  # a LoRA world's base
        frozen_sh[key] = parallel.logical_shardings(logical, mesh, rules)
    if methods.needs_reference(config.method):
        frozen = dict(frozen, reference=jax.tree.map(_sds, world.params))
        frozen_sh = dict(frozen_sh, reference=shardings.params)
    batch_sh = jax.tree.map(
        lambda x: parallel.batch_sharding(mesh) if len(x.shape) else parallel.replicated(mesh),
        batch)
    step_fn = jax.jit(
        train.make_train_step(world.pipe, config.method, optimizer, config.optim.ema_decay,
                              config.optim.grad_clip, world.assemble),
        in_shardings=(shardings, frozen_sh, batch_sh),
        out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
    args = (state, frozen, batch)
    return step_fn, (args, (shardings, frozen_sh, batch_sh))


def shard_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` (abstract arrays) under `shardings`."""
    sizes = jax.tree.map(lambda x, s: math.prod(s.shard_shape(tuple(x.shape)))
                         * np.dtype(x.dtype).itemsize, tree, shardings)
    return int(sum(jax.tree.leaves(sizes)))


def _sub_jaxprs(params: dict) -> list[tuple[Any, int]]:
    """(jaxpr, multiplicity) of every sub-computation of an equation, loops x trip count."""
    out = []
    for key, value in params.items():
        if key == "branches":
            continue
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                out.append(inner)
    return out


def matmul_flops(jaxpr: Any) -> tuple[float, float, int]:
    """`(total, once, unknown_loops)`: dot_general FLOPs of a jaxpr, global (unpartitioned).

    `total` multiplies scan bodies by their length; `once` counts each loop body once, as
    XLA's cost analysis does; while loops whose trip count is not static count once in
    both (`unknown_loops` of them). `cond` takes its most expensive branch.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = once = 0.0
    unknown = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            f = 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc)
            total, once = total + f, once + f
            continue
        if name == "cond":
            costs = [matmul_flops(b) for b in eqn.params["branches"]]
            t, o, u = max(costs)
            total, once, unknown = total + t, once + o, unknown + u
            continue
        mult = eqn.params["length"] if name == "scan" else 1
        if name == "while":
            unknown += 1
        for inner in _sub_jaxprs(eqn.params):
            t, o, u = matmul_flops(inner)
            total, once, unknown = total + mult * t, once + o, unknown + u
    return total, once, unknown


def _compile(config, world, mesh, rules, batch_size: int, mc: FluxConfig) -> dict:
    """Compiles the step at a global batch; memory, FLOPs and timings as a dict."""
    batch = abstract_batch(mc, batch_size, geometry(config).text_len)
    t0 = time.perf_counter()
    step_fn, (args, shardings) = jit_train_step(config, world, mesh, rules, batch)
    traced = step_fn.trace(*args)
    t_trace = time.perf_counter() - t0
    lowered = traced.lower()
    # The plan never runs the executable: on CPU, LLVM's optimisations are skipped (they
    # change neither the buffer assignment nor the HLO cost analysis, and halve compile time).
    compiled = lowered.compile(compiler_options=FAST_CPU_COMPILE) \
        if jax.default_backend() == "cpu" else lowered.compile()
    t_compile = time.perf_counter() - t0 - t_trace
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total, once, unknown = matmul_flops(traced.jaxpr)
    state, frozen, batch = args
    state_sh, frozen_sh, batch_sh = shardings
    n = mesh.size
    return {
        "batch": batch_size,
        "params": shard_bytes(state.params, state_sh.params),
        "optimizer": shard_bytes(state.opt_state, state_sh.opt_state),
        "ema": shard_bytes(state.ema_params, state_sh.ema_params),
        "state_other": shard_bytes((state.step, state.rng, state.nonfinite_run),
                                   (state_sh.step, state_sh.rng, state_sh.nonfinite_run)),
        "frozen": shard_bytes(frozen, frozen_sh),
        "batch_bytes": shard_bytes(batch, batch_sh),
        "arguments": int(mem.argument_size_in_bytes),
        "output": int(mem.output_size_in_bytes),
        "alias": int(mem.alias_size_in_bytes),
        "temp": int(mem.temp_size_in_bytes),
        "cost_flops": float(cost.get("flops", 0.0)),
        "jaxpr_flops": total / n,
        "jaxpr_flops_once": once / n,
        "unknown_loops": unknown,
        "trace_s": t_trace,
        "compile_s": t_compile,
    }


# ----------------------------------------------------------------------------- analytic


def live_gradient_calls(method_cfg: Any, num_steps: int) -> tuple[int, str]:
    """Velocity calls whose saved activations coexist at the backward pass, and why."""
    name = method_cfg.name
    if name == "leapalign":
        return 1, "two leaps, leap 1 recomputed after leap 2's backward"
    if name == "draft":
        k = int(method_cfg.k)
        return (1, f"{k} steps, each rematerialised") if k > 1 else (1, "one step")
    if name == "draft_lv":
        return int(method_cfg.n), f"{method_cfg.n} re-noised copies"
    if name == "drtune":
        return int(method_cfg.k), f"{method_cfg.k} training steps"
    if name == "alignprop":
        if method_cfg.remat:
            return 1, f"{num_steps} steps, each rematerialised"
        return num_steps, f"all {num_steps} steps"
    if name == "grpo":
        return 1, "training steps rematerialised one at a time"
    return 1, "one step"


def block_activation_elems(mc: FluxConfig, tokens: int, policy: str) -> tuple[float, float]:
    """Saved activation elements per sample of one (double, single) block under a policy.

    `none` keeps what the backward pass reads: per token of a double-block stream ~12h + 2m
    (modulated input, q/k before the norm, q/k/v after rope, attention output, residual,
    MLP input, MLP hidden before and after GELU, the two gated branches), ~8h + 2m in a
    single block, plus the H x N^2 attention probabilities (XLA's attention, no flash
    kernel); `dots_saveable` keeps matmul outputs (qkv, projections, MLP hidden, logits);
    `full` keeps only the block input, N x h, and so does `offload` on the device (its
    weight-matmul outputs, about `dots_saveable` less the attention terms, sit in host
    memory).
    """
    h, m, heads, n = mc.hidden_size, mc.mlp_hidden_dim, mc.num_heads, tokens
    attn = heads * n * n
    if policy in ("full", "offload"):  # offload: the matmul outputs wait in host memory
        return n * h, n * h
    if policy == "dots_saveable":
        return n * (6 * h + m) + attn, n * (5 * h + m) + attn
    return n * (12 * h + 2 * m) + attn, n * (8 * h + 2 * m) + attn


def analytic_terms(mc: FluxConfig, param_count: int, shard_factor: float, tokens: int,
                   batch_per_device: int, live_calls: int, weight_copy_factor: float
                   ) -> dict[str, float]:
    """Per-device bytes of each term of the step from first principles.

    Params, gradients, EMA and the two Adam moments are float32 and split `shard_factor`
    ways (FSDP x tensor). Activations: `live_calls` gradient calls per sample, each keeping
    every block's saved activations (`block_activation_elems`) in the compute dtype, plus,
    under remat, one block's full activations recomputed during its backward pass. With a
    bfloat16 compute dtype a cast copy of the (local) weights is counted too.
    """
    e = np.dtype(mc.compute_dtype).itemsize
    p = 4.0 * param_count / shard_factor
    double, single = block_activation_elems(mc, tokens, mc.remat)
    per_call = mc.depth * double + mc.depth_single_blocks * single
    acts = live_calls * batch_per_device * per_call * e
    if mc.remat != "none":
        d_full, s_full = block_activation_elems(mc, tokens, "none")
        acts += batch_per_device * max(d_full if mc.depth else 0,
                                       s_full if mc.depth_single_blocks else 0) * e
    weights = weight_copy_factor * param_count * e / shard_factor if e != 4 else 0.0
    return {"params": p, "gradients": p, "optimizer": 2 * p, "ema": p,
            "activations": float(acts), "weight_copy": float(weights)}


# ----------------------------------------------------------------------------- the plan


def _resolved_mesh_shape(config: ml_collections.ConfigDict, available: int) -> list[int]:
    shape = [int(s) for s in (config.plan.mesh or config.mesh.shape)]
    if -1 in shape:
        n = config.plan.num_devices or available
        known = math.prod(s for s in shape if s != -1)
        if n % known:
            raise ValueError(f"config.mesh.shape {shape} does not divide "
                             f"config.plan.num_devices={n}; fix one of them")
        shape[shape.index(-1)] = n // known
    return shape


def _with_plan(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    defaults = plan_config()
    if "plan" not in config:
        config.plan = defaults
    else:
        for key, value in defaults.items():
            if key not in config.plan:
                config.plan[key] = value
    return config


def run_plan(config: ml_collections.ConfigDict) -> dict:
    """Compiles the config's train step from shapes and returns its plan (a JSON-able dict).

    Runs in a subprocess with simulated CPU devices when the mesh is larger than this
    host. Prints the report; raises ValueError (one line naming the largest term and what
    to change) when `config.plan.check_fit` and the step does not fit `config.plan.chip`.
    """
    config = _with_plan(config)
    result = compute_plan(config)
    print(format_plan(result))
    if config.plan.check_fit:
        check_fit(result, config.plan.chip, config.plan.hbm_gib, config.plan.usable_fraction,
                  config.plan.fit_on)
    return result


def compute_plan(config: ml_collections.ConfigDict) -> dict:
    """The plan's numbers (no printing, no fit check); see `run_plan`."""
    config = _with_plan(config)
    if config.plan.chip not in CHIPS:
        raise ValueError(f"config.plan.chip={config.plan.chip!r}: use one of {sorted(CHIPS)}")
    shape = _resolved_mesh_shape(config, len(jax.devices()))
    needed = math.prod(shape)
    if needed > len(jax.devices()):
        return _plan_in_subprocess(config, shape)
    return _plan_here(config, shape)


def _plan_in_subprocess(config: ml_collections.ConfigDict, shape: list[int]) -> dict:
    """Re-runs the plan on `prod(shape)` simulated CPU devices; returns its dict."""
    n = math.prod(shape)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out_path = os.path.join(tmp, "config.json"), os.path.join(tmp, "plan.json")
        sub = ml_collections.ConfigDict(config.to_dict())
        sub.mesh.shape = shape
        with open(cfg_path, "w", encoding="utf-8") as f:
            f.write(sub.to_json())
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={n}").strip()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        proc = subprocess.run(
            [sys.executable, "-m", "leapalign_jax.plan", f"--config_json={cfg_path}",
             f"--out_json={out_path}"], env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out_path):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-20:]
            raise RuntimeError(f"plan subprocess on {n} simulated devices failed:\n"
                               + "\n".join(tail))
        with open(out_path, encoding="utf-8") as f:
            result = json.load(f)
    result["backend"] += f" (subprocess, {n} simulated devices)"
    return result


def _extrapolate(a: dict, b: dict, x_a: float, x_b: float, x: float) -> dict:
    """Every number of `a` (at x_a) and `b` (at x_b) extrapolated linearly to x."""
    out = dict(b)
    for key, va in a.items():
        if isinstance(va, (int, float)) and not key.endswith("_s") and key != "unknown_loops":
            out[key] = va + (x - x_a) / (x_b - x_a) * (b[key] - va)
    out["compile_s"] = a["compile_s"] + b["compile_s"]
    out["trace_s"] = a["trace_s"] + b["trace_s"]
    return out


def _compile_batch(config, mc: FluxConfig, mesh, rules, per_device: int) -> dict:
    """The compiled numbers at the config's batch (or extrapolated to it, see
    `plan.compile_batch_per_device`)."""
    world = abstract_world(config, mc)
    dp = parallel.data_parallel_size(mesh)
    small = int(config.plan.compile_batch_per_device)
    if small and small < per_device:
        a = _compile(config, world, mesh, rules, small * dp, mc)
        b = _compile(config, world, mesh, rules, 2 * small * dp, mc)
        compiled = _extrapolate(a, b, small, 2 * small, per_device)
        compiled["compiled_batches_per_device"] = [small, 2 * small]
    else:
        compiled = _compile(config, world, mesh, rules, per_device * dp, mc)
        compiled["compiled_batches_per_device"] = [per_device]
    compiled["batch"] = per_device * dp
    return compiled


def _plan_here(config: ml_collections.ConfigDict, shape: list[int]) -> dict:
    mc = model_config(config)
    devices = jax.devices()[:math.prod(shape)]
    mesh = parallel.make_mesh(shape, devices)
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.mesh.rules)
    world = abstract_world(config, mc)
    dp = parallel.data_parallel_size(mesh)
    batch = int(config.train.batch_size)
    if batch % dp:
        raise ValueError(f"config.train.batch_size={batch} is not divisible by the {dp} "
                         "data-parallel devices of config.mesh.shape; change one of them")
    per_device = batch // dp
    n = int(config.plan.compile_units)
    g = math.gcd(mc.depth, mc.depth_single_blocks)
    if n and 2 * n < g:
        unit = (mc.depth // g, mc.depth_single_blocks // g)
        a, b = (_compile_batch(config, dataclasses.replace(
            mc, depth=unit[0] * u, depth_single_blocks=unit[1] * u), mesh, rules, per_device)
            for u in (n, 2 * n))
        compiled = _extrapolate(a, b, n, 2 * n, g)
        compiled["compiled_units"] = [[unit[0] * n, unit[1] * n], [unit[0] * 2 * n,
                                                                     unit[1] * 2 * n]]
        # The state's shards are known exactly from the full model's shapes.
        optimizer = train.make_optimizer(config.optim)
        shardings = train.state_shardings(world, optimizer, mesh, rules)
        state = jax.eval_shape(lambda p: train.create_train_state(p, optimizer, 0),
                               world.params)
        exact = {"params": shard_bytes(state.params, shardings.params),
                 "optimizer": shard_bytes(state.opt_state, shardings.opt_state),
                 "ema": shard_bytes(state.ema_params, shardings.ema_params)}
        compiled["extrapolation_error_bytes"] = max(
            abs(compiled[k] - v) for k, v in exact.items())
        compiled.update(exact)
    else:
        compiled = _compile_batch(config, mc, mesh, rules, per_device)
        compiled["compiled_units"] = []

    param_count = int(sum(math.prod(x.shape) for x in jax.tree.leaves(world.params)))
    shard_factor = mesh.shape["fsdp"] * mesh.shape["tensor"]
    calls, why = live_gradient_calls(config.method, world.pipe.num_steps)
    g = geometry(config)
    tokens = g.height_tokens * g.width_tokens + g.text_len
    analytic = analytic_terms(mc, param_count, shard_factor, tokens, per_device, calls, 1.0)
    loop_extra = compiled["jaxpr_flops"] - compiled["jaxpr_flops_once"]
    flops = compiled["cost_flops"] + loop_extra
    peak = compiled["arguments"] + compiled["temp"] + compiled["output"] - compiled["alias"]
    pc = config.plan
    return {
        "model": dataclasses.asdict(mc), "method": config.method.name,
        "mesh": dict(mesh.shape), "devices": mesh.size,
        "backend": f"{jax.default_backend()} ({devices[0].device_kind})",
        "jax": jax.__version__,
        "batch": batch, "batch_per_device": per_device,
        "image_tokens": g.height_tokens * g.width_tokens, "text_tokens": g.text_len,
        "num_steps": world.pipe.num_steps, "param_count": param_count,
        "frozen_param_count": int(sum(math.prod(x.shape) for x in jax.tree.leaves(
            world.frozen.get("base", {})))),
        "lora_rank": int(config.lora.rank) if world.assemble is not None else 0,
        "live_gradient_calls": [calls, why],
        "remat_knob": ("config.world.remat" if config.world.name == "flux"
                       else "config.world.model.remat"),
        "compiled": dict(compiled, peak=peak), "analytic": analytic,
        "flops_per_device": flops, "loop_extra_flops": loop_extra,
        "mfu": pc.mfu,
        "seconds_per_iter": {k: flops / (pc.mfu * c.peak_flops) for k, c in CHIPS.items()},
        "chip": pc.chip, "hbm_gib": pc.hbm_gib, "usable_fraction": pc.usable_fraction,
    }


# ----------------------------------------------------------------------------- fit


def memory_terms(plan: dict) -> dict[str, float]:
    """Per-device terms of the peak: compiled state shards, gradients and the rest of temp."""
    c, a = plan["compiled"], plan["analytic"]
    grads = min(a["gradients"], c["temp"])
    return {"params": c["params"], "optimizer moments": c["optimizer"], "EMA": c["ema"],
            "gradients": grads, "activations and other temporaries": c["temp"] - grads,
            "frozen, batch, outputs": c["frozen"] + c["batch_bytes"] + c["state_other"]
            + c["output"] - c["alias"]}


def peak_bytes(plan: dict, fit_on: str = "compiled") -> float:
    """The per-device peak the fit is judged on: compiled, or the analytic terms' sum."""
    if fit_on == "analytic":
        c = plan["compiled"]
        return sum(plan["analytic"].values()) + c["frozen"] + c["batch_bytes"]
    if fit_on != "compiled":
        raise ValueError(f"config.plan.fit_on={fit_on!r}: use 'compiled' or 'analytic'")
    return plan["compiled"]["peak"]


def budget_bytes(chip: str, hbm_gib: float | None, usable_fraction: float) -> float:
    hbm = CHIPS[chip].hbm_gib if hbm_gib is None else hbm_gib
    return hbm * GIB * usable_fraction


def fits(plan: dict, chip: str, hbm_gib: float | None = None, usable_fraction: float = 0.9,
         fit_on: str = "compiled") -> bool:
    return peak_bytes(plan, fit_on) <= budget_bytes(chip, hbm_gib, usable_fraction)


def check_fit(plan: dict, chip: str, hbm_gib: float | None = None,
              usable_fraction: float = 0.9, fit_on: str = "compiled") -> None:
    """Raises ValueError (one line) when the plan's peak exceeds the chip's usable HBM.

    The message names the largest term and what to change for it.
    """
    budget = budget_bytes(chip, hbm_gib, usable_fraction)
    peak = peak_bytes(plan, fit_on)
    if peak <= budget:
        return
    terms = memory_terms(plan) if fit_on == "compiled" else {
        "params": plan["analytic"]["params"],
        "optimizer moments": plan["analytic"]["optimizer"], "EMA": plan["analytic"]["ema"],
        "gradients": plan["analytic"]["gradients"],
        "activations and other temporaries": plan["analytic"]["activations"]
        + plan["analytic"]["weight_copy"]}
    largest = max(terms, key=terms.get)
    mesh, model = plan["mesh"], plan["model"]
    if largest in ("params", "optimizer moments", "EMA", "gradients"):
        fix = (f"shard the weights over more devices (config.mesh.shape fsdp axis, now "
               f"{mesh['fsdp']}) or train LoRA adapters instead of every weight")
    elif largest == "activations and other temporaries":
        knob = plan.get("remat_knob", "config.world.model.remat")
        fix = (f"recompute block activations ({knob}=full, now {model['remat']}), "
               if model["remat"] != "full" else "")
        fix += (f"lower the per-device batch (now {plan['batch_per_device']}: "
                "config.train.batch_size or more data-parallel devices) or use LoRA")
        if fit_on == "compiled" and plan["backend"].startswith("cpu") \
                and model["remat"] != "none":
            fix += ("; XLA:CPU keeps rematerialised activations alive, so for a TPU/GPU run "
                    "also judge with config.plan.fit_on=analytic")
    else:
        fix = "lower config.train.batch_size"
    raise ValueError(
        f"plan: the step needs {peak / GIB:.1f} GiB per device ({fit_on}) but {chip} allows "
        f"{budget / GIB:.1f} GiB ({usable_fraction:.0%} of "
        f"{CHIPS[chip].hbm_gib if hbm_gib is None else hbm_gib:g} GiB); the largest term is "
        f"{largest} ({terms[largest] / GIB:.1f} GiB): {fix}")


# ----------------------------------------------------------------------------- report


def _g(b: float) -> str:
    return f"{b / GIB:8.2f}"


def format_plan(plan: dict) -> str:
    """A Markdown report of one plan: settings, memory table, FLOPs and times."""
    m, c, a = plan["model"], plan["compiled"], plan["analytic"]
    mesh = "x".join(str(v) for v in plan["mesh"].values())
    batches = c["compiled_batches_per_device"]
    how = (f"compiled at {batches[0]} per device" if len(batches) == 1 else
           f"compiled at {batches[0]} and {batches[1]} per device, temporaries and FLOPs "
           f"extrapolated linearly to {plan['batch_per_device']}")
    units = c.get("compiled_units") or []
    if units:
        how += (f"; the step was compiled with {units[0][0]}+{units[0][1]} and {units[1][0]}+"
                f"{units[1][1]} blocks and every compiled number extrapolated linearly in "
                f"the blocks to {m['depth']}+{m['depth_single_blocks']} (state shards "
                "exact from the full model's shapes; the extrapolated ones were off by "
                f"{c['extrapolation_error_bytes'] / 2 ** 20:.2f} MiB)")
    size = f"{plan['param_count'] / 1e9:.3f}B params"
    if plan.get("lora_rank"):
        size = (f"{plan['frozen_param_count'] / 1e9:.2f}B frozen params; LoRA rank "
                f"{plan['lora_rank']}: {plan['param_count'] / 1e9:.3f}B trainable")
    lines = [
        f"**{plan['method']}**, Flux {m['depth']}+{m['depth_single_blocks']} blocks, hidden "
        f"{m['hidden_size']} ({size}), {m['dtype']}, remat "
        f"{m['remat']}; {plan['image_tokens']} image + {plan['text_tokens']} text tokens, "
        f"T = {plan['num_steps']}, batch {plan['batch']} ({plan['batch_per_device']} per "
        f"device, {how}); mesh (data, fsdp, tensor) = {mesh} on {plan['devices']} devices; "
        f"compiled by XLA {plan['backend']}, jax {plan['jax']}, in {c['compile_s']:.0f} s.",
        "",
        "| per device (GiB) | compiled | analytic |",
        "|---|---:|---:|",
        f"| trainable params (fp32) | {_g(c['params'])} | {_g(a['params'])} |",
        f"| optimizer (Adam moments) | {_g(c['optimizer'])} | {_g(a['optimizer'])} |",
        f"| EMA | {_g(c['ema'])} | {_g(a['ema'])} |",
        f"| gradients | in temp | {_g(a['gradients'])} |",
        f"| activations ({plan['live_gradient_calls'][0]} live gradient call(s): "
        f"{plan['live_gradient_calls'][1]}) | in temp | {_g(a['activations'])} |",
        f"| compute-dtype weight copy | in temp | {_g(a['weight_copy'])} |",
        f"| temporaries (memory_analysis temp) | {_g(c['temp'])} | "
        f"{_g(a['gradients'] + a['activations'] + a['weight_copy'])} |",
        f"| frozen + batch + outputs - donated | "
        f"{_g(c['frozen'] + c['batch_bytes'] + c['output'] - c['alias'] + c['state_other'])}"
        " | |",
        f"| **peak** (arguments + temp + outputs - aliased) | **{_g(c['peak'])}** | "
        f"{_g(sum(a.values()))} |",
        "",
        f"FLOPs per iteration per device: {plan['flops_per_device'] / 1e12:.1f} TFLOP "
        f"(cost_analysis {c['cost_flops'] / 1e12:.1f} TFLOP counts each loop body once; "
        f"+{plan['loop_extra_flops'] / 1e12:.1f} TFLOP for the further loop trips, from the "
        f"jaxpr's dot_generals; jaxpr total {c['jaxpr_flops'] / 1e12:.1f} TFLOP"
        + (f"; {c['unknown_loops']} while loop(s) of unknown trip count counted once"
           if c["unknown_loops"] else "") + ").",
        "",
        f"Iteration time at MFU {plan['mfu']}: " + ", ".join(
            f"{k} {v:.1f} s" for k, v in plan["seconds_per_iter"].items()) + ".",
        "",
        f"Fits one chip (peak <= {plan['usable_fraction']:.0%} of its HBM), compiled / "
        "analytic: " + ", ".join(
            f"{k} ({CHIPS[k].hbm_gib:g} GiB) "
            + "/".join("yes" if fits(plan, k, None, plan["usable_fraction"], on) else "no"
                       for on in ("compiled", "analytic")) for k in CHIPS) + ".",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry


def main(argv: list[str]) -> None:
    """`python -m leapalign_jax.plan --config FILE [--config.x=y]` (or the subprocess's
    `--config_json FILE --out_json FILE`)."""
    from absl import flags
    del argv
    flags_ = flags.FLAGS
    if flags_.config_json:
        with open(flags_.config_json, encoding="utf-8") as f:
            config = ml_collections.ConfigDict(json.load(f))
        result = _plan_here(config, [int(s) for s in config.mesh.shape])
        with open(flags_.out_json, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return
    config = flags_.config
    if config is None:
        raise SystemExit("--config is required, e.g. --config configs/random_flux.py")
    config = ml_collections.ConfigDict(config.to_dict())
    config.plan = flags_.plan  # standalone entry: the knobs come as --plan.<knob>
    try:
        run_plan(config)
    except ValueError as e:  # one line, like leapalign_jax.main
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from absl import app, flags as _flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
    config_flags.DEFINE_config_dict("plan", plan_config(), "The plan's knobs (--plan.chip=v5p).")
    _flags.DEFINE_string("config_json", None, "Config as JSON (the simulated-devices subprocess).")
    _flags.DEFINE_string("out_json", None, "Where the subprocess writes its plan.")
    app.run(main)
