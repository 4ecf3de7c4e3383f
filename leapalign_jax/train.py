"""The trainer: TrainState, one jitted sharded `train_step`, and the loop around it.

The trainer never knows which method runs: it calls `methods.get_loss(name)` with the
world's pipeline. Everything inside `train_step` is pure; the loop owns I/O (metrics,
image grids, checkpoints, SIGTERM) and calls `Hook`s, so callers can evaluate mid-run
without wrapping the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers
from flax import struct
from jax.experimental import multihost_utils
from tqdm import tqdm

from leapalign_jax import checkpoint, methods, parallel, sampling
from leapalign_jax.pipeline import Batch, Params, World

# Exit status of a run stopped by SIGTERM after writing its checkpoint (preemption).
PREEMPTED_EXIT_CODE = 42


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
    """Global-norm clipping then AdamW (the paper: lr 1e-5, betas 0.9/0.999, wd 1e-4)."""
    lr = optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps) \
        if optim.warmup_steps else optim.learning_rate
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip),
        optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=optim.weight_decay))


def create_train_state(params: Params, optimizer: optax.GradientTransformation,
                       seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        ema_params=jax.tree.map(jnp.array, params), opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(seed)), nonfinite_run=jnp.zeros((), jnp.int32))


def make_train_step(pipe, method_cfg: ml_collections.ConfigDict,
                    optimizer: optax.GradientTransformation, ema_decay: float
                    ) -> Callable[[TrainState, Params, Batch], tuple[TrainState, dict]]:
    """`train_step(state, frozen, batch) -> (state, metrics)`, pure and unjitted.

    A step whose loss or gradient is not finite leaves params, optimizer state and EMA
    unchanged (the step counter still advances, so the data stream moves on) and is
    counted in `nonfinite_run`.
    """
    loss_fn = methods.get_loss(method_cfg.name)
    cfg = ml_collections.FrozenConfigDict(method_cfg)

    def train_step(state: TrainState, frozen: Params, batch: Batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, frozen, batch, rng, pipe, cfg)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Zeroed gradients keep NaNs out of the optimizer moments of a skipped step.
        grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                           state.ema_params, params)
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda n, o: jnp.where(finite, n, o), new, old)
        state = state.replace(
            step=state.step + 1, params=keep(params, state.params),
            ema_params=keep(ema, state.ema_params), opt_state=keep(opt_state, state.opt_state),
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


def _frozen_with_reference(config, world: World, mesh, shardings: Any) -> tuple[Any, Any]:
    """The frozen tree (replicated) plus, when the method asks for it, the initial params
    as `frozen["reference"]`, sharded like the params."""
    frozen = jax.device_put(world.frozen, parallel.replicated(mesh))
    frozen_sh = jax.tree.map(lambda _: parallel.replicated(mesh), frozen)
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
    process0 = jax.process_index() == 0
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
        logging.info("restored step %d from %s", int(state.step), workdir)
    frozen, frozen_sh = _frozen_with_reference(config, world, mesh, shardings)

    batch_sh = jax.tree.map(
        lambda x: parallel.batch_sharding(mesh) if np.ndim(x) else parallel.replicated(mesh),
        world.train_batch(0))
    step_fn = jax.jit(
        make_train_step(world.pipe, config.method, optimizer, config.optim.ema_decay),
        in_shardings=(shardings, frozen_sh, batch_sh),
        out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
    sample_fn = sampling.make_sample_fn(world.pipe)

    writer = metric_writers.create_default_writer(workdir, just_logging=not process0)
    stop = _StopFlag()
    previous_handler = signal.signal(signal.SIGTERM, stop)
    start, total = int(jax.device_get(state.step)), tc.steps
    meta = lambda s: {"fingerprint": fingerprint, "data_position": s}  # noqa: E731
    try:
        bar = tqdm(range(start, total), initial=start, total=total, disable=not process0,
                   desc="align", dynamic_ncols=True)
        for step in bar:
            t0 = time.perf_counter()
            batch = parallel.shard_batch(world.train_batch(step), mesh)
            state, metrics = step_fn(state, frozen, batch)
            metrics, run = jax.device_get((metrics, state.nonfinite_run))  # waits for the step
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics["step_time_s"] = time.perf_counter() - t0
            done = step + 1
            last = done == total
            if int(run) >= tc.max_nonfinite_steps:
                raise TrainingError(
                    f"{int(run)} consecutive steps had a non-finite loss or gradient; "
                    "lower config.optim.learning_rate or check the reward. The last good "
                    "checkpoint is kept.")
            if done % tc.log_every == 0 or last:
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
                images = sample_fn(state.ema_params, frozen,
                                   parallel.shard_batch(world.eval_batch, mesh),
                                   jax.random.key(config.seed))
                images = multihost_utils.process_allgather(images, tiled=True)
                if process0:
                    sampling.save_grid(images,
                                       os.path.join(workdir, "images", f"{done:06d}.png"))
            if done % tc.checkpoint_every == 0 or last or stop.requested:
                checkpoint.save(manager, state, meta(done))
            if stop.requested:
                manager.wait_until_finished()
                logging.warning("SIGTERM: checkpoint written at step %d; exiting", done)
                raise SystemExit(PREEMPTED_EXIT_CODE)
        writer.flush()
    finally:
        manager.wait_until_finished()
        manager.close()
        signal.signal(signal.SIGTERM, previous_handler)
    return state
