"""Cost of one training iteration of every method, at several rollout lengths T.

    python benchmarks/cost.py                       # T in {10, 25, 50}, 3 rounds (~1 h here)
    python benchmarks/cost.py --steps 10 --rounds 2 --tiny --out /tmp/cost.md   # seconds

For each T and each method (LeapAlign with and without block remat, AlignProp with and
without remat, DRaFT-1, DRaFT-T/2, ReFL with and without block remat, DRTune, GRPO) the
trainer's own step is built from its public pieces (`train.make_train_step`,
`train.make_optimizer`, `methods.default_config`), jitted with the state donated as the
trainer does, compiled once, and then

- timed: the median of `--rounds` calls after compilation; the calls are interleaved over
  all (T, method) pairs, round by round, so every method sees the same machine load;
- sized: `memory_analysis().temp_size_in_bytes` of the compiled step (the per-iteration
  working set beyond the params, optimizer state and batch);
- counted: the step's matmul FLOPs (its jaxpr's dot_generals, loops times their trip
  count) in units of one velocity call (forward), and the same minus the T-call rollout.

The generator is a Flux of ~21M parameters (hidden 384, 6 heads, 2 double + 4 single
blocks; 64 image + 16 text tokens, batch 2, float32) with the random_flux world's
identity-like decoder and colour reward (`leapalign_jax.plan.standin_decode`), so the
network dominates. `--speed` adds the CPU speed of the same network against diffusers'
torch `FluxTransformer2DModel` with the same weights (256 image + 64 text tokens).

Writes `--out` (Markdown). Text below the line `<!-- notes -->` of an existing file (the
hand-written analysis) is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from leapalign_jax import flow, methods, train  # noqa: E402
from leapalign_jax.models.flux import Flux, FluxConfig, init_params  # noqa: E402
from leapalign_jax.pipeline import Pipeline  # noqa: E402
from leapalign_jax.plan import matmul_flops, standin_decode, standin_reward  # noqa: E402
from leapalign_jax.world import flux_velocity  # noqa: E402

NOTES_MARKER = "<!-- notes -->"
MIB = 2 ** 20

# The benchmark network: ~21M parameters; FLUX.1's head dim / rotary split scaled down.
MODEL = FluxConfig(in_channels=64, vec_in_dim=768, context_in_dim=512, hidden_size=384,
                   num_heads=6, axes_dim=(8, 28, 28), depth=2, depth_single_blocks=4)
TINY = FluxConfig(in_channels=16, vec_in_dim=16, context_in_dim=32, hidden_size=32,
                  num_heads=2, axes_dim=(4, 6, 6), depth=1, depth_single_blocks=1)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: a method, its knobs (a function of T) and the model's block remat."""

    key: str
    label: str
    method: str
    knobs: Callable[[int, int], dict[str, Any]] = lambda t, b: {}
    remat: str = "none"


VARIANTS = (
    Variant("alignprop", "AlignProp (remat)", "alignprop", lambda t, b: {"remat": True}),
    Variant("alignprop_noremat", "AlignProp (no remat)", "alignprop",
            lambda t, b: {"remat": False}),
    Variant("leapalign", "LeapAlign", "leapalign"),
    Variant("leapalign_remat", "LeapAlign + block remat", "leapalign", remat="full"),
    Variant("draft1", "DRaFT-1", "draft", lambda t, b: {"k": 1}),
    Variant("draft_half", "DRaFT-T/2", "draft", lambda t, b: {"k": max(1, t // 2)}),
    Variant("refl", "ReFL", "refl"),
    Variant("refl_remat", "ReFL + block remat", "refl", remat="full"),
    Variant("drtune", "DRTune", "drtune"),
    Variant("grpo", "GRPO", "grpo", lambda t, b: {"group_size": b}),
)


def make_pipe(mc: FluxConfig, side: int, text_len: int, num_steps: int) -> Pipeline:
    """The random_flux world's pipeline at this size: Flux velocity, stand-in judges."""
    seq = side * side
    guidance = 3.5 if mc.guidance_embed else None
    return Pipeline(
        velocity=flux_velocity(Flux(mc), flow.image_ids(side, side), flow.text_ids(text_len),
                               guidance),
        decode=standin_decode, reward=standin_reward,
        sigmas=flow.flux_sigmas(num_steps, seq), latent_shape=(seq, mc.in_channels))


def method_config(variant: Variant, num_steps: int, batch: int):
    cfg = methods.default_config(variant.method)
    if "hinge_lambda" in cfg:
        cfg.hinge_lambda = 1.0  # the stand-in reward lies in (-1, 1): the hinge is always on
    cfg.update(variant.knobs(num_steps, batch))
    return cfg


class Case:
    """A compiled train step of one (variant, T), ready to time."""

    def __init__(self, variant: Variant, num_steps: int, mc: FluxConfig, side: int,
                 text_len: int, batch: int, state: Any, base_config: Any):
        self.variant, self.num_steps = variant, num_steps
        mc = dataclasses.replace(mc, remat=variant.remat)
        pipe = make_pipe(mc, side, text_len, num_steps)
        cfg = method_config(variant, num_steps, batch)
        optimizer = train.make_optimizer(base_config.optim)
        step = jax.jit(train.make_train_step(pipe, cfg, optimizer, base_config.optim.ema_decay,
                                             base_config.optim.grad_clip),
                       donate_argnums=(0,))
        rs = np.random.default_rng(0)
        self.batch = {"cond": {
            "txt": jnp.asarray(rs.standard_normal((batch, text_len, mc.context_in_dim)),
                               jnp.float32),
            "y": jnp.asarray(rs.standard_normal((batch, mc.vec_in_dim)), jnp.float32)},
            "prompt_id": jnp.arange(batch, dtype=jnp.int32)}
        self.state = state  # shared by every case: each call donates a fresh copy
        t0 = time.perf_counter()
        traced = step.trace(self.state, {}, self.batch)
        self.compiled = traced.lower().compile()
        self.compile_s = time.perf_counter() - t0
        self.temp = self.compiled.memory_analysis().temp_size_in_bytes
        self.flops = matmul_flops(traced.jaxpr)[0]
        self.times: list[float] = []

    def run_once(self) -> float:
        """Seconds of one step on a fresh copy of the state (the step donates it)."""
        state = jax.block_until_ready(jax.tree.map(jnp.copy, self.state))
        t0 = time.perf_counter()
        jax.block_until_ready(self.compiled(state, {}, self.batch))
        dt = time.perf_counter() - t0
        self.times.append(dt)
        return dt


def select_guard_train_step(pipe, method_cfg, optim_cfg) -> Callable:
    """The trainer's step as it was before the memory fix (same maths), for comparison:
    `optax.clip_by_global_norm` then AdamW, and the non-finite guard as
    `where(finite, new, old)` selects over params, EMA and moments. The clipped gradient
    copy and the copies of both moment trees it costs are explained in
    benchmarks/results/cost.md."""
    import optax

    loss_fn = methods.get_loss(method_cfg.name)
    cfg = ml_collections_frozen(method_cfg)
    optimizer = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), optax.adamw(
        optim_cfg.learning_rate, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay))
    decay = optim_cfg.ema_decay

    def train_step(state, frozen, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, frozen, batch, rng, pipe, cfg)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda n, o: jnp.where(finite, n, o), new, old)
        state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              ema_params=keep(ema, state.ema_params),
                              opt_state=keep(opt_state, state.opt_state),
                              nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1))
        return state, dict(metrics, loss=loss, grad_norm=grad_norm,
                           nonfinite=1.0 - finite.astype(jnp.float32))

    return train_step


def ml_collections_frozen(cfg: Any) -> Any:
    import ml_collections
    return ml_collections.FrozenConfigDict(cfg)


def step_memory_section(args, mc: FluxConfig) -> str:
    """Compiled temp of `select_guard_train_step` against the trainer's step, T = 25."""
    from leapalign_jax.config_lib import base_config
    from leapalign_jax.plan import FAST_CPU_COMPILE

    base = base_config()
    t = 25 if 25 in args.steps else args.steps[0]
    params = jax.eval_shape(lambda: init_params(mc, jax.random.key(0)))
    optimizer = train.make_optimizer(base.optim)
    state = jax.eval_shape(lambda p: train.create_train_state(p, optimizer, 0), params)
    keys = ("alignprop_noremat", "leapalign", "leapalign_remat", "refl", "refl_remat")
    rows = ["| image tokens | method | select-guard step temp MiB | trainer step temp MiB |",
            "|---:|---|---:|---:|"]
    for side in args.step_memory_sides:
        batch = {"cond": {
            "txt": jax.ShapeDtypeStruct((args.batch, args.text_len, mc.context_in_dim),
                                        jnp.float32),
            "y": jax.ShapeDtypeStruct((args.batch, mc.vec_in_dim), jnp.float32)},
            "prompt_id": jax.ShapeDtypeStruct((args.batch,), jnp.int32)}
        for key in keys:
            v = next(x for x in VARIANTS if x.key == key)
            pipe = make_pipe(dataclasses.replace(mc, remat=v.remat), side, args.text_len, t)
            cfg = method_config(v, t, args.batch)
            temps = []
            for fn in (select_guard_train_step(pipe, cfg, base.optim),
                       train.make_train_step(pipe, cfg, optimizer, base.optim.ema_decay,
                                             base.optim.grad_clip)):
                compiled = jax.jit(fn, donate_argnums=(0,)).lower(state, {}, batch).compile(
                    compiler_options=FAST_CPU_COMPILE)
                temps.append(compiled.memory_analysis().temp_size_in_bytes / MIB)
            print(f"step memory: {side * side} tokens {key} {temps}", flush=True)
            rows.append(f"| {side * side} | {v.label} | {temps[0]:.1f} | {temps[1]:.1f} |")
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return "\n".join([
        f"T = {t}, batch {args.batch}, {args.text_len} text tokens; one gradient-sized "
        f"buffer = {4 * n_params / MIB:.1f} MiB. Compile only (LLVM optimisations off, "
        "which changes neither buffer assignment nor temp).", "", *rows])


def forward_flops(mc: FluxConfig, side: int, text_len: int, batch: int) -> float:
    """Matmul FLOPs of one velocity call (the unit of the "calls" columns)."""
    pipe = make_pipe(mc, side, text_len, 1)
    params = jax.eval_shape(lambda: init_params(mc, jax.random.key(0)))
    x = jax.ShapeDtypeStruct((batch, side * side, mc.in_channels), jnp.float32)
    cond = {"txt": jax.ShapeDtypeStruct((batch, text_len, mc.context_in_dim), jnp.float32),
            "y": jax.ShapeDtypeStruct((batch, mc.vec_in_dim), jnp.float32)}
    s = jax.ShapeDtypeStruct((batch,), jnp.float32)
    return matmul_flops(jax.make_jaxpr(pipe.velocity)(params, x, s, cond))[0]


def load_average() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def cost_section(args, mc: FluxConfig) -> tuple[str, dict]:
    from leapalign_jax.config_lib import base_config

    base = base_config()
    params = init_params(mc, jax.random.key(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    state = train.create_train_state(params, train.make_optimizer(base.optim), 0)
    keys = args.methods or [v.key for v in VARIANTS]
    variants = [v for v in VARIANTS if v.key in keys]
    fwd = forward_flops(mc, args.side, args.text_len, args.batch)
    load_before = load_average()
    cases: dict[tuple[int, str], Case] = {}
    for t in args.steps:
        for v in variants:
            print(f"compiling T={t} {v.key}", flush=True)
            cases[t, v.key] = Case(v, t, mc, args.side, args.text_len, args.batch, state,
                                   base)
            cases[t, v.key].run_once()  # warm-up, not counted
            cases[t, v.key].times.clear()
    load_compiled = load_average()
    for r in range(args.rounds):
        for case in cases.values():
            case.run_once()
        print(f"round {r + 1}/{args.rounds} done (load {load_average()})", flush=True)
    load_after = load_average()

    lines = [
        f"Flux {mc.depth}+{mc.depth_single_blocks} blocks, hidden {mc.hidden_size}, "
        f"{mc.num_heads} heads, {n_params / 1e6:.1f}M params, {mc.dtype}; "
        f"{args.side ** 2} image + {args.text_len} text tokens, batch {args.batch}; one "
        f"velocity call = {fwd / 1e9:.2f} GFLOP (matmuls). Median of {args.rounds} "
        f"interleaved calls after compilation; AdamW + EMA step included.",
        "",
        f"Load average (1/5/15 min) before compiling {load_before}, before timing "
        f"{load_compiled}, after timing {load_after}, on {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}).",
        "",
        "*calls*: the step's matmul FLOPs in units of one forward velocity call (backward "
        "~2, recomputation 1); *beyond rollout*: the same minus the T calls of a rollout.",
    ]
    results: dict = {}
    for t in args.steps:
        ref_time = statistics.median(cases[t, "alignprop"].times) if (t, "alignprop") in cases \
            else float("nan")
        ref_mem = cases[t, "alignprop"].temp if (t, "alignprop") in cases else float("nan")
        ref_mem_nr = cases[t, "alignprop_noremat"].temp \
            if (t, "alignprop_noremat") in cases else float("nan")
        lines += ["", f"### T = {t}", "",
                  "| method | s/iter | x AlignProp (remat) | temp MiB | x AlignProp (remat) "
                  "| x AlignProp (no remat) | calls | beyond rollout | compile s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for v in variants:
            c = cases[t, v.key]
            med = statistics.median(c.times)
            calls = c.flops / fwd
            results[t, v.key] = {"time": med, "temp": c.temp, "calls": calls}
            lines.append(
                f"| {v.label} | {med:.3f} | {med / ref_time:.2f} | {c.temp / MIB:.1f} | "
                f"{c.temp / ref_mem:.3f} | {c.temp / ref_mem_nr:.3f} | {calls:.1f} | "
                f"{calls - t:.1f} | {c.compile_s:.0f} |")
    lines += ["", goals(results, args.steps)]
    return "\n".join(lines), results


def goals(results: dict, steps: list[int]) -> str:
    """The paper's cost claims as measured (pass or fail, whichever way they go)."""
    def get(t, key, field):
        return results.get((t, key), {}).get(field, float("nan"))

    t = 25 if 25 in steps else steps[len(steps) // 2]
    rows = ["### Goals", "", "| claim | measured | goal | met |", "|---|---:|---:|---|"]

    def row(text, value, goal, ok):
        rows.append(f"| {text} | {value:.3f} | {goal} | {'yes' if ok else 'no'} |")

    r = get(t, "leapalign", "time") / get(t, "alignprop", "time")
    row(f"LeapAlign time / AlignProp (remat) time, T={t}", r, "<= 0.30", r <= 0.30)
    r = get(t, "leapalign", "temp") / get(t, "alignprop_noremat", "temp")
    row(f"LeapAlign temp / AlignProp (no remat) temp, T={t}", r, "<= 0.10", r <= 0.10)
    mems = [get(s, "leapalign", "temp") for s in steps]
    r = max(mems) / min(mems) - 1.0
    row(f"LeapAlign temp spread over T={steps} (max/min - 1)", r, "<= 0.10", r <= 0.10)
    calls = [get(s, "leapalign", "calls") - s for s in steps]
    r = max(calls) - min(calls)
    row(f"LeapAlign calls beyond the rollout, spread over T (now {calls[0]:.1f})", r,
        "~0 (T-independent)", r < 0.5)
    for ref in ("refl", "refl_remat"):
        r = get(t, "leapalign_remat", "temp") / get(t, ref, "temp")
        name = "ReFL" + (" + block remat" if ref.endswith("remat") else "")
        row(f"LeapAlign + block remat temp / {name} temp, T={t}", r, "<= 1.2", r <= 1.2)
    return "\n".join(rows)


# ----------------------------------------------------------------------------- CPU speed


def speed_section(args, mc: FluxConfig) -> str:
    """Forward and forward+backward of our Flux against diffusers' torch model, same weights."""
    try:
        import torch
        from diffusers import FluxTransformer2DModel
    except ImportError as e:
        return f"(skipped: {e})"
    import tempfile

    from leapalign_jax.weights.flux import save_flux_diffusers

    side, text_len, b = args.speed_side, args.speed_text_len, args.batch
    params = init_params(mc, jax.random.key(1))
    # Randomise every parameter (biases, norms and the zero-init ones too).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(tree, [
        x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    with tempfile.TemporaryDirectory() as tmp:
        save_flux_diffusers(tmp, mc, params)
        ref = FluxTransformer2DModel.from_pretrained(tmp, torch_dtype=torch.float32).eval()
    rs = np.random.default_rng(0)
    x = rs.standard_normal((b, side * side, mc.in_channels)).astype(np.float32)
    txt = rs.standard_normal((b, text_len, mc.context_in_dim)).astype(np.float32)
    y = rs.standard_normal((b, mc.vec_in_dim)).astype(np.float32)
    t = np.full((b,), 0.7, np.float32)
    g = np.full((b,), 3.5, np.float32)
    img_ids, txt_ids = flow.image_ids(side, side), flow.text_ids(text_len)

    model = Flux(mc)

    def apply(p):
        return model.apply({"params": p}, x, np.broadcast_to(img_ids, (b,) + img_ids.shape),
                           txt, np.broadcast_to(txt_ids, (b,) + txt_ids.shape), t, y, g)

    fwd = jax.jit(apply).lower(params).compile()
    grad = jax.jit(jax.value_and_grad(lambda p: jnp.mean(apply(p) ** 2))).lower(params).compile()
    tx = {k: torch.from_numpy(v) for k, v in dict(x=x, txt=txt, y=y, t=t, g=g).items()}
    t_img, t_txt = torch.from_numpy(img_ids), torch.from_numpy(txt_ids)

    def torch_apply():
        return ref(hidden_states=tx["x"], encoder_hidden_states=tx["txt"],
                   pooled_projections=tx["y"], timestep=tx["t"], img_ids=t_img,
                   txt_ids=t_txt, guidance=tx["g"], return_dict=False)[0]

    def torch_fwd():
        with torch.no_grad():
            return torch_apply()

    def torch_grad():
        ref.zero_grad(set_to_none=True)
        loss = torch_apply().pow(2).mean()
        loss.backward()
        return loss

    out_j = np.asarray(fwd(params))
    out_t = torch_fwd().numpy()
    err = float(np.max(np.abs(out_j - out_t)) / (np.max(np.abs(out_t)) + 1e-12))
    jax.block_until_ready(grad(params))
    torch_grad()
    runs = {"jax fwd": lambda: jax.block_until_ready(fwd(params)),
            "torch fwd": torch_fwd,
            "jax fwd+bwd": lambda: jax.block_until_ready(grad(params)),
            "torch fwd+bwd": torch_grad}
    times = {k: [] for k in runs}
    for _ in range(args.speed_rounds):  # interleaved, like the cost runs
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    profile = profile_table(grad, grad.as_text(), (params,))
    return "\n".join([
        f"Same network, {side * side} image + {text_len} text tokens, batch {b}, float32, "
        f"same weights (exported with `save_flux_diffusers`, loaded by diffusers "
        f"`FluxTransformer2DModel`; max relative output difference {err:.1e}); median of "
        f"{args.speed_rounds} interleaved calls; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, jax {jax.__version__}; load {load_average()}.",
        "",
        "| pass | jax s | torch s | jax / torch |",
        "|---|---:|---:|---:|",
        f"| forward | {med['jax fwd']:.3f} | {med['torch fwd']:.3f} | "
        f"{med['jax fwd'] / med['torch fwd']:.2f} |",
        f"| forward + backward | {med['jax fwd+bwd']:.3f} | {med['torch fwd+bwd']:.3f} | "
        f"{med['jax fwd+bwd'] / med['torch fwd+bwd']:.2f} |",
        "",
        "Where our forward + backward spends its time (jax.profiler trace of the compiled "
        "value_and_grad, per-op events grouped by the op's pass and kind; matmuls are XLA:CPU's "
        "`dot` (Eigen) and `ynn_fusion` (XNNPACK) kernels):",
        "",
        profile,
    ])


def _op_kind(name: str, line: str) -> str:
    """A coarse kind of one compiled HLO instruction: matmul, layout, reduction, ..."""
    if name.startswith(("ynn_fusion", "dot", "convolution")) or " dot(" in line:
        return "matmul"
    if "transpose" in name or "copy" in name or "bitcast" in name or "pad" in name \
            or "concatenate" in name or "slice" in name:
        return "transpose / copy / slice"
    if "reduce" in name:
        return "reduction"
    if name.startswith(("while", "call", "conditional")):
        return "control flow"
    return "elementwise"


def profile_table(compiled: Any, hlo_text: str, args: tuple, runs: int = 3) -> str:
    """Per-op CPU time of `compiled(*args)` from a jax.profiler trace, grouped by the op's
    pass (forward, or backward: op_name under `transpose(...)`) and kind, as Markdown."""
    import collections
    import glob
    import gzip
    import json
    import re
    import tempfile

    info = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if m:
            op = re.search(r'op_name="([^"]+)"', line)
            info[m.group(1)] = ("backward" if op and "transpose(" in op.group(1) else "forward",
                                _op_kind(m.group(1), line))
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(runs):
                jax.block_until_ready(compiled(*args))
        paths = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
        if not paths:
            return "(no trace written)"
        with gzip.open(paths[0]) as f:
            data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in info:
            total[info[e["name"]]] += e.get("dur", 0.0) / 1e3 / runs  # ms per call
    whole = sum(total.values()) or 1.0
    rows = [f"Ops account for {whole:.1f} ms per call.", "",
            "| pass | kind | ms per call | share |", "|---|---|---:|---:|"]
    for (direction, kind), ms in total.most_common():
        rows.append(f"| {direction} | {kind} | {ms:.1f} | {ms / whole:.0%} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per case")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--side", type=int, default=8, help="image tokens per side")
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--methods", nargs="*", help=f"subset of {[v.key for v in VARIANTS]}")
    parser.add_argument("--speed", action="store_true",
                        help="add the CPU speed comparison with diffusers (torch)")
    parser.add_argument("--speed-side", type=int, default=16)
    parser.add_argument("--speed-text-len", type=int, default=64)
    parser.add_argument("--speed-rounds", type=int, default=5)
    parser.add_argument("--step-memory", action="store_true",
                        help="add the temp of the trainer's step against the select-guard step")
    parser.add_argument("--step-memory-sides", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--no-cost", action="store_true", help="skip the cost tables")
    parser.add_argument("--tiny", action="store_true", help="a tiny Flux (smoke test)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "cost.md"))
    args = parser.parse_args()
    mc = TINY if args.tiny else MODEL

    parts = ["# Iteration cost of the alignment methods", "",
             f"Made by `python benchmarks/{os.path.basename(__file__)} "
             f"{' '.join(sys.argv[1:])}` on {jax.default_backend()} "
             f"({jax.devices()[0].device_kind}), jax {jax.__version__}.", ""]
    if args.speed:
        parts += ["## CPU speed of our Flux against diffusers (torch)", "",
                  speed_section(args, mc), ""]
    if not args.no_cost:
        text, _ = cost_section(args, mc)
        parts += ["## Time and temporary memory per iteration", "", text, ""]
    if args.step_memory:
        parts += ["## Temporary memory of the trainer step against the select-guard step", "",
                  step_memory_section(args, mc), ""]
    notes = ""
    if os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            old = f.read()
        if NOTES_MARKER in old:
            notes = old[old.index(NOTES_MARKER):]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(parts) + ("\n" + notes if notes else ""))
    print("\n".join(parts))


if __name__ == "__main__":
    main()
