"""The trainer: TrainState, one jitted sharded `train_step`, and the loop around it.

The trainer never knows which method runs: it calls `methods.get_loss(name)` with the
world's pipeline. Everything inside `train_step` is pure; the loop owns I/O (metrics,
image grids, checkpoints, SIGTERM) and calls `Hook`s, so callers can evaluate mid-run
without wrapping the loop.

Multi-host: every process runs this loop. Each reads only its rows of the step's global
batch (`data.process_rows` of the batch sharding) and `data.global_batch` assembles the
global arrays. A SIGTERM reaches one host at a time, so the stop flag is agreed every step
(`paths.any_process`): all hosts save the same step and exit with PREEMPTED_EXIT_CODE.
A host that dies outright (SIGKILL, a lost VM) cannot be agreed with: the others stop at
their next collective when JAX's coordination service misses its heartbeat (an error
exit, not a hang), and the rerun resumes from the last checkpoint all hosts finished
(tests/test_multihost.py). Process 0 writes TensorBoard (`summaries`), image grids, the
progress bar and an optional profiler trace.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import signal
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import parameter_overview
from flax import struct
from tqdm import tqdm

from leapalign_jax import checkpoint, data, methods, parallel, paths, sampling, summaries
from leapalign_jax.pipeline import Batch, Params, World

# Exit status of a run stopped by SIGTERM after writing its checkpoint (preemption).
PREEMPTED_EXIT_CODE = 42


def console(message: str) -> None:
    """One line for the person at the console (stderr, process 0), kept clear of the
    progress bar; the log file gets it too."""
    logging.info(message)
    if paths.is_writer():
        tqdm.write(message, file=sys.stderr)


class TrainingError(RuntimeError):
    """A run that cannot continue (too many non-finite steps)."""


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 scalar: completed optimizer steps (= data position)
    params: Params
    ema_params: Params
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
    nonfinite_run: jax.Array  # consecutive steps skipped for a non-finite loss/gradient


@dataclasses.dataclass(frozen=True)
class Hook:
    """A callback of the train loop.

    `fn(step, state, metrics)` runs after every `every`-th completed step and after the
    last one; `metrics` are that step's host scalars (with `step_time_s`). A returned
    dict of scalars is written to the metric writers at that step.
    """

    fn: Callable[[int, TrainState, dict[str, float]], dict[str, float] | None]
    every: int = 1


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (the paper: lr 1e-5, betas 0.9/0.999, wd 1e-4) after global-norm clipping.

    The clip is applied by `make_train_step` as one scalar factor fused with the non-finite
    guard; `optax.identity()` holds its place so the optimizer state keeps the tree of
    `chain(clip_by_global_norm, adamw)` (older checkpoints restore).
    """
    lr = optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps) \
        if optim.warmup_steps else optim.learning_rate
    return optax.chain(
        optax.identity(),
        optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=optim.weight_decay))


def create_train_state(params: Params, optimizer: optax.GradientTransformation,
                       seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        ema_params=jax.tree.map(jnp.array, params), opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)), nonfinite_run=jnp.zeros((), jnp.int32))


def make_train_step(pipe, method_cfg: ml_collections.ConfigDict,
                    optimizer: optax.GradientTransformation, ema_decay: float,
                    grad_clip: float, assemble: Callable[[Params, Params], Params] | None = None
                    ) -> Callable[[TrainState, Params, Batch], tuple[TrainState, dict]]:
    """`train_step(state, frozen, batch) -> (state, metrics)`, pure and unjitted.

    Gradients are clipped to global norm `grad_clip`, then `optimizer` (`make_optimizer`)
    updates the params and the EMA follows. A step whose loss or gradient is not finite
    leaves params, optimizer state and EMA unchanged (the step counter still advances, so
    the data stream moves on) and is counted in `nonfinite_run`. `assemble` (a LoRA
    world's `World.assemble`) turns the trainable params, and the method's reference
    params, into the velocity's params.

    Memory: the clip is one scalar multiply (it fuses into the moment updates instead of
    writing a clipped copy of the gradient) and the guard is a `lax.cond` (selects
    between new and old moments would make XLA copy both moment trees of the donated
    state); see benchmarks/results/cost.md.
    """
    loss_fn = methods.get_loss(method_cfg.name)
    cfg = ml_collections.FrozenConfigDict(method_cfg)
    assemble = assemble or (lambda trainable, frozen: trainable)

    def loss_of(trainable, frozen, batch, rng):
        if "reference" in frozen:
            frozen = dict(frozen, reference=assemble(frozen["reference"], frozen))
        return loss_fn(assemble(trainable, frozen), frozen, batch, rng, pipe, cfg)

    def train_step(state: TrainState, frozen: Params, batch: Batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.params, frozen, batch, rng)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Zero for a skipped step, so NaNs never reach the arithmetic below.
        scale = jnp.where(finite, jnp.minimum(1.0, grad_clip / jnp.maximum(grad_norm, 1e-30)),
                          0.0)
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)

        def update(carry):
            params, ema, opt_state = carry
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
            return params, ema, opt_state

        params, ema, opt_state = jax.lax.cond(
            finite, update, lambda carry: carry,
            (state.params, state.ema_params, state.opt_state))
        state = state.replace(
            step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1))
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                       nonfinite=1.0 - finite.astype(jnp.float32))
        return state, metrics

    return train_step


def state_shardings(world: World, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, rules) -> Any:
    """Shardings of the whole TrainState from the params' logical axes.

    The optimizer moments and EMA inherit the params' boxes through `jax.eval_shape`, so
    they are sharded exactly like the params they track.
    """
    if world.param_axes is None:
        abstract = jax.eval_shape(create_train_state, world.params, optimizer, 0)
        return jax.tree.map(lambda _: parallel.replicated(mesh), abstract)
    abstract = jax.eval_shape(
        lambda p: create_train_state(p, optimizer, 0), world.param_axes)
    return parallel.logical_shardings(abstract, mesh, rules)


def mesh_and_rules(config: ml_collections.ConfigDict) -> tuple[jax.sharding.Mesh, tuple]:
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.mesh.rules)
    return parallel.make_mesh(config.mesh.shape), rules


def param_shardings(config: ml_collections.ConfigDict, world: World) -> Any:
    """Shardings of the trainable params alone (for restoring them for inference)."""
    mesh, rules = mesh_and_rules(config)
    return state_shardings(world, make_optimizer(config.optim), mesh, rules).params


def run_fingerprint(config: ml_collections.ConfigDict, world: World) -> dict:
    """Every knob that changes a run's results; a checkpoint resumes only if it matches.

    Length, logging, checkpointing and the mesh may change between a run and its resume.
    """
    return {"world": world.fingerprint, "method": config.method.to_dict(),
            "optim": config.optim.to_dict(), "seed": config.seed,
            "batch_size": config.train.batch_size}


class _StopFlag:
    """Set by SIGTERM; the loop checks it between steps (TPU VM preemption notice)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:  # signal handler
        self.requested = True


def process_batch(world: World, step: int, rows: np.ndarray) -> Batch:
    """This process's rows of step `step`'s global batch (numpy).

    A world's `train_batch(step, rows=...)` reads only those prompts; a `train_batch(step)`
    without `rows` (a wrapped or test world) is sliced after the fact.
    """
    if "rows" in inspect.signature(world.train_batch).parameters:
        return world.train_batch(step, rows=rows)
    return jax.tree.map(lambda x: np.asarray(x)[rows] if np.ndim(x) else x,
                        world.train_batch(step))


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as flat `a.b.c -> scalar` hyperparameters (lists become strings)."""
    out = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        elif value is not None:
            out[prefix] = str(value)

    walk("", config.to_dict())
    return out


def place_frozen(config, world: World, mesh, rules, shardings: Any
                           ) -> tuple[Any, Any]:
    """The frozen tree plus, when the method asks for it, the initial params as
    `frozen["reference"]`, sharded like the params.

    Entries named in `world.frozen_axes` (a LoRA world's base) are sharded by their logical
    axes; other frozen arrays a world already placed on this mesh (a streamed VAE or T5)
    keep their shards, and everything else is replicated.
    """
    def place(x):  # replicate() also copies single-device arrays onto a pod's mesh
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh:
            return x
        return parallel.replicate(x, mesh)

    axes = world.frozen_axes or {}
    frozen = {k: v if k in axes else jax.tree.map(place, v) for k, v in world.frozen.items()}
    for key, logical in axes.items():
        frozen[key] = parallel.place(frozen[key],
                                     parallel.logical_shardings(logical, mesh, rules))
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    if methods.needs_reference(config.method):
        copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.params)
        frozen = dict(frozen, reference=copy(world.params))
        frozen_sh = dict(frozen_sh, reference=shardings.params)
    return frozen, frozen_sh


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, world: World,
                       hooks: Sequence[Hook] = ()) -> TrainState:
    """Trains `config.train.steps` steps in `workdir`, resuming from its last checkpoint.

    `hooks` run after their steps (see `Hook`); the checkpoint of a step is written after
    its hooks, so a resumed run never repeats a hook's step.
    """
    tc = config.train
    process0 = paths.is_writer()
    mesh, rules = mesh_and_rules(config)
    optimizer = make_optimizer(config.optim)
    shardings = state_shardings(world, optimizer, mesh, rules)
    state = jax.jit(lambda p: create_train_state(p, optimizer, config.seed),
                    out_shardings=shardings)(world.params)
    if tc.start_fresh:
        checkpoint.set_aside(workdir)
    fingerprint = run_fingerprint(config, world)
    manager = checkpoint.manager(workdir, tc.keep_checkpoints)
    restored = checkpoint.restore(manager, state, shardings, fingerprint)
    if restored is not None:
        state = restored[0]
        console(f"restored step {int(state.step)} from {workdir}")
    # The trained tree's names, shapes and sizes (a LoRA run: the adapters) in the log file.
    parameter_overview.log_parameter_overview(state.params, include_stats=False,
                                              msg="trained parameters", jax_logging_process=0)
    frozen, frozen_sh = place_frozen(config, world, mesh, rules, shardings)

    rows = data.process_rows(tc.batch_size, parallel.batch_sharding(mesh))
    batch_sh = jax.tree.map(
        lambda x: parallel.batch_sharding(mesh) if np.ndim(x) else parallel.replicated(mesh),
        process_batch(world, 0, rows))
    step_fn = jax.jit(
        make_train_step(world.pipe, config.method, optimizer, config.optim.ema_decay,
                        config.optim.grad_clip, world.assemble),
        in_shardings=(shardings, frozen_sh, batch_sh),
        out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
    sample_fn = sampling.make_sample_fn(world.pipe)

    writer = summaries.SummaryWriter(paths.join(workdir), enabled=process0)
    stop = _StopFlag()
    previous_handler = signal.signal(signal.SIGTERM, stop)
    start, total = int(jax.device_get(state.step)), tc.steps
    meta = lambda s: {"fingerprint": fingerprint, "data_position": s}  # noqa: E731
    if start == 0:
        writer.write_hparams(flat_hparams(config))
    # Traced steps (JAX profiler, process 0), past the first steps' compilation.
    traced = range(start + 5, start + 5 + tc.get("profile_steps", 0)) if process0 else range(0)
    last_log = (start, time.perf_counter())  # for steps_per_sec
    try:
        bar = tqdm(range(start, total), initial=start, total=total, disable=not process0,
                   desc="align", dynamic_ncols=True)
        for step in bar:
            if traced and step == traced.start:
                jax.profiler.start_trace(paths.join(workdir))
            t0 = time.perf_counter()
            batch = data.global_batch(process_batch(world, step, rows), mesh)
            state, metrics = step_fn(state, frozen, batch)
            metrics, run = jax.device_get((metrics, state.nonfinite_run))  # waits for the step
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics["step_time_s"] = time.perf_counter() - t0
            done = step + 1
            last = done == total
            if traced and done == traced.stop:
                jax.profiler.stop_trace()
            # One host got SIGTERM: all of them save this step and stop together.
            stopping = paths.any_process(stop.requested)
            if int(run) >= tc.max_nonfinite_steps:
                raise TrainingError(
                    f"{int(run)} consecutive steps had a non-finite loss or gradient; "
                    "lower config.optim.learning_rate or check the reward. The last good "
                    "checkpoint is kept.")
            if done % tc.log_every == 0 or last:
                now = time.perf_counter()
                metrics["steps_per_sec"] = (done - last_log[0]) / (now - last_log[1])
                last_log = (done, now)
                writer.write_scalars(done, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                reward=f"{metrics.get('reward_mean', float('nan')):.4f}")
            for hook in hooks:
                if done % hook.every == 0 or last:
                    extra = hook.fn(done, state, metrics)
                    if extra:
                        writer.write_scalars(done, extra)
            if tc.image_every and (done % tc.image_every == 0 or last):
                # Every process joins the sharded sampling; process 0 writes the grid.
                images = sampling.on_mesh(
                    sample_fn, mesh, world.velocity_params(state.ema_params, frozen), frozen,
                    world.eval_batch, jax.random.key(config.seed))
                if process0:
                    grid = sampling.save_grid(
                        images, paths.join(workdir, "images", f"{done:06d}.png"),
                        captions=world.eval_prompts)
                    writer.write_image(done, "samples", grid)
            if done % tc.checkpoint_every == 0 or last or stopping:
                checkpoint.save(manager, state, meta(done))
            if stopping:
                manager.wait_until_finished()
                writer.flush()
                logging.warning("SIGTERM: checkpoint written at step %d; exiting", done)
                raise SystemExit(PREEMPTED_EXIT_CODE)
        writer.flush()
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        signal.signal(signal.SIGTERM, previous_handler)
    return state
