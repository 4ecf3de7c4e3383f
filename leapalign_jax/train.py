"""The trainer: TrainState, one jitted sharded `train_step`, the loop, checkpoints, metrics.

The trainer never knows which method runs: it calls `methods.get_loss(name)` with the
world's pipeline. Everything inside `train_step` is pure; the loop around it owns I/O.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from jax.experimental import multihost_utils
from tqdm import tqdm

from leapalign_jax import methods, parallel, sampling
from leapalign_jax.pipeline import Batch, Params, Pipeline
from leapalign_jax.world import World, build_world

# Exit status of a run stopped by SIGTERM after writing its checkpoint (preemption).
PREEMPTED_EXIT_CODE = 42


class TrainingError(RuntimeError):
    """A run that cannot continue (too many non-finite steps, incompatible checkpoint)."""


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 scalar: completed optimizer steps (= data position)
    params: Params
    ema_params: Params
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays
    nonfinite_run: jax.Array  # consecutive steps skipped for a non-finite loss/gradient


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


def make_train_step(pipe: Pipeline, method_cfg: ml_collections.ConfigDict,
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


def _checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))


def run_fingerprint(config: ml_collections.ConfigDict, world: World) -> dict:
    """What must match between a checkpoint and the run resuming from it."""
    return {"world": world.fingerprint, "method": config.method.name}


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, meta: dict) -> None:
    step = int(jax.device_get(state.step))
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)


def restore_checkpoint(manager: ocp.CheckpointManager, like: TrainState, shardings: Any,
                       fingerprint: dict) -> tuple[TrainState, dict] | None:
    """The newest readable checkpoint restored onto `shardings`, or None when there is none.

    Orbax finalises a checkpoint by renaming it, so a write cut short is never listed;
    a listed one that fails to read (a damaged file) is moved to `checkpoints-unreadable/`
    (kept for inspection, out of the way of new saves) and the one before it is used.
    A checkpoint of another run (its fingerprint differs) raises TrainingError before
    anything is read or moved.
    """
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like, shardings)
    expected = json.loads(json.dumps(fingerprint))
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            meta = manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
            _set_aside_unreadable(manager, step, e)
            continue
        if meta.get("fingerprint") != expected:
            raise TrainingError(
                f"{os.path.dirname(os.fspath(manager.directory))} holds a checkpoint of a "
                f"different run ({meta.get('fingerprint')}); use another --workdir or pass "
                "--config.train.start_fresh=True")
        try:
            state = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract))).state
        except Exception as e:  # noqa: BLE001
            _set_aside_unreadable(manager, step, e)
            continue
        return state, meta
    return None


def _set_aside_unreadable(manager: ocp.CheckpointManager, step: int, error: Exception) -> None:
    directory = os.fspath(manager.directory)
    aside = os.path.join(os.path.dirname(directory), "checkpoints-unreadable",
                         f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    os.rename(os.path.join(directory, str(step)), aside)
    manager.reload()
    logging.warning("checkpoint %d is unreadable (%s); moved it to %s and trying an older "
                    "one", step, str(error).splitlines()[0][:200], aside)


def _setup(config: ml_collections.ConfigDict, workdir: str, world: World):
    """Mesh, optimizer, state shardings, and the state: restored if `workdir` has one."""
    mesh = parallel.make_mesh(config.mesh.shape)
    rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.mesh.rules)
    optimizer = make_optimizer(config.optim)
    shardings = state_shardings(world, optimizer, mesh, rules)
    state = jax.jit(lambda p: create_train_state(p, optimizer, config.seed),
                    out_shardings=shardings)(world.params)
    if config.train.start_fresh:
        _set_aside_checkpoints(workdir)
    manager = _checkpoint_manager(workdir, config.train.keep_checkpoints)
    restored = restore_checkpoint(manager, state, shardings, run_fingerprint(config, world))
    if restored is not None:
        state, _ = restored
        logging.info("restored step %d from %s", int(state.step), workdir)
    return mesh, optimizer, shardings, state, manager


def _set_aside_checkpoints(workdir: str) -> None:
    """Moves an existing checkpoint folder out of the way; nothing is deleted."""
    path = os.path.join(workdir, "checkpoints")
    if os.path.isdir(path) and os.listdir(path):
        aside = f"{path}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(path, aside)
        logging.warning("start_fresh: moved the previous checkpoints to %s", aside)


def trained_params(config: ml_collections.ConfigDict, workdir: str, world: World,
                   ema: bool = True) -> tuple[Params, int]:
    """The (EMA) params of the latest checkpoint in `workdir`, or the world's initial
    params at step 0 when there is none."""
    _, _, _, state, manager = _setup(config, workdir, world)
    manager.close()
    return (state.ema_params if ema else state.params), int(jax.device_get(state.step))


def sample_from_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Samples the world's evaluation prompts with the latest EMA params; returns the PNG."""
    world = build_world(config)
    params, step = trained_params(config, workdir, world)
    images = sampling.make_sample_fn(world.pipe)(params, world.frozen, world.eval_batch,
                                                 jax.random.key(config.seed))
    path = os.path.join(workdir, "samples", f"{step:06d}.png")
    sampling.save_grid(images, path)
    logging.info("wrote %s", path)
    print(path)
    return path


class _StopFlag:
    """Set by SIGTERM; the loop checks it between steps (TPU VM preemption notice)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:  # signal handler
        self.requested = True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       world: World | None = None) -> TrainState:
    """Trains `config.train.steps` steps in `workdir`, resuming from its last checkpoint."""
    world = build_world(config) if world is None else world
    process0 = jax.process_index() == 0
    mesh, optimizer, shardings, state, manager = _setup(config, workdir, world)
    frozen = jax.device_put(world.frozen, parallel.replicated(mesh))
    fingerprint = run_fingerprint(config, world)

    example = world.train_batch(0)
    batch_sh = jax.tree.map(
        lambda x: parallel.batch_sharding(mesh) if np.ndim(x) else parallel.replicated(mesh),
        example)
    frozen_sh = jax.tree.map(lambda _: parallel.replicated(mesh), frozen)
    step_fn = jax.jit(
        make_train_step(world.pipe, config.method, optimizer, config.optim.ema_decay),
        in_shardings=(shardings, frozen_sh, batch_sh),
        out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
    sample_fn = sampling.make_sample_fn(world.pipe)

    from clu import metric_writers
    writer = metric_writers.create_default_writer(workdir, just_logging=not process0)
    stop = _StopFlag()
    previous_handler = signal.signal(signal.SIGTERM, stop)
    start = int(jax.device_get(state.step))
    total = config.train.steps
    meta = lambda s: {"fingerprint": fingerprint, "data_position": s}  # noqa: E731
    tc = config.train
    last_log, t_last = start, time.perf_counter()
    try:
        bar = tqdm(range(start, total), initial=start, total=total, disable=not process0,
                   desc="align", dynamic_ncols=True)
        for step in bar:
            batch = parallel.shard_batch(world.train_batch(step), mesh)
            state, metrics = step_fn(state, frozen, batch)
            done = step + 1
            if done % tc.log_every == 0 or done == total:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                metrics["step_time_s"] = (now - t_last) / (done - last_log)
                last_log, t_last = done, now
                writer.write_scalars(done, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                reward=f"{metrics.get('reward_mean', float('nan')):.4f}")
                run = int(jax.device_get(state.nonfinite_run))
                if run >= tc.max_nonfinite_steps:
                    raise TrainingError(
                        f"{run} consecutive steps had a non-finite loss or gradient; "
                        "lower config.optim.learning_rate or check the reward. The last "
                        "good checkpoint is kept.")
            if tc.image_every and (done % tc.image_every == 0 or done == total):
                # Every process joins the sharded sampling; process 0 writes the grid.
                images = sample_fn(state.ema_params, frozen,
                                   parallel.shard_batch(world.eval_batch, mesh),
                                   jax.random.key(config.seed))
                images = multihost_utils.process_allgather(images, tiled=True)
                if process0:
                    sampling.save_grid(images,
                                       os.path.join(workdir, "images", f"{done:06d}.png"))
            if done % tc.checkpoint_every == 0 or done == total or stop.requested:
                save_checkpoint(manager, state, meta(done))
            if stop.requested:
                manager.wait_until_finished()
                logging.warning("SIGTERM: checkpoint written at step %d; exiting", done)
                raise SystemExit(PREEMPTED_EXIT_CODE)
        writer.flush()
    finally:
        manager.wait_until_finished()
        signal.signal(signal.SIGTERM, previous_handler)
    return state


def train_and_report(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    """Trains, then (for worlds with an evaluator) writes and prints a before/after table
    of the base model and the aligned EMA params on the world's held-out prompts."""
    from leapalign_jax import evaluate

    world = build_world(config)
    rows: dict[str, dict] = {}
    if world.evaluate is not None:
        base_dir = os.path.join(workdir, "eval", "base")
        done = os.path.join(base_dir, "results.json")
        if os.path.exists(done):
            with open(done, encoding="utf-8") as f:
                rows["base"] = json.load(f)
        else:
            rows["base"] = world.evaluate(world.params, base_dir)
    state = train_and_evaluate(config, workdir, world)
    if world.evaluate is not None:
        step = int(jax.device_get(state.step))
        rows[f"{config.method.name} (step {step})"] = world.evaluate(
            state.ema_params, os.path.join(workdir, "eval", f"step_{step:06d}"))
        table = evaluate.format_table(rows)
        with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        print(table)
    return rows

