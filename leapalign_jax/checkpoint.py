"""Checkpoints: the orbax manager, saving, restoring for training and for inference.

A checkpoint holds the whole `TrainState` (as a pytree) and a JSON `meta` with the run's
fingerprint. Folders are `paths` (local or gs://); on a pod every process takes part in
saving and restoring (orbax writes each process's shards), and moving folders aside is done
by process 0 after all processes agreed on it. Training restores everything and refuses a
checkpoint of another run; inference restores only the EMA params and never moves or
deletes anything, so `task=evaluate` or `task=sample` can run beside (or after) training
without touching it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from leapalign_jax import paths

CHECKPOINTS = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint that belongs to another run (its fingerprint differs)."""


def manager(workdir: str, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    """The async orbax manager of `workdir/checkpoints`, keeping the newest `keep`."""
    return ocp.CheckpointManager(
        paths.join(workdir, CHECKPOINTS),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                             enable_async_checkpointing=True))


def save(mngr: ocp.CheckpointManager, state: Any, meta: dict) -> None:
    """Saves `state` at its step (async; `mngr.wait_until_finished()` to block)."""
    step = int(jax.device_get(state.step))
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)


def _abstract(like: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        like, shardings)


def restore(mngr: ocp.CheckpointManager, like: Any, shardings: Any,
            fingerprint: dict) -> tuple[Any, dict] | None:
    """The newest readable checkpoint restored onto `shardings`, or None when there is none.

    Orbax finalises a checkpoint by renaming it, so a write cut short is never listed; a
    listed one that fails to read (a damaged file) is moved to `checkpoints-unreadable/`
    (kept for inspection, out of the way of new saves) and the one before it is used. A
    checkpoint of another run raises CheckpointError before anything is read or moved.
    """
    expected = json.loads(json.dumps(fingerprint))
    abstract = _abstract(like, shardings)
    for step in sorted(mngr.all_steps(), reverse=True):
        meta, error = _agreed_try(lambda: mngr.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta)
        if error is not None:
            _set_aside_unreadable(mngr, step, error)
            continue
        if meta.get("fingerprint") != expected:
            raise CheckpointError(
                f"{paths.path(mngr.directory).parent} holds a checkpoint of a "
                f"different run (differs in {_differences(meta.get('fingerprint'), expected)});"
                " use another --workdir or pass --config.train.start_fresh=True")
        state, error = _agreed_try(lambda: mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))).state)
        if error is not None:
            _set_aside_unreadable(mngr, step, error)
            continue
        return state, meta
    return None


def _agreed_try(read) -> tuple[Any, Exception | None]:
    """`(read(), None)`, or `(None, error)` on every process when it failed on any one:
    a checkpoint with one damaged shard is unreadable for the whole job."""
    try:
        value, error = read(), None
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
        value, error = None, e
    if paths.any_process(error is not None):
        return None, error or RuntimeError("unreadable on another process")
    return value, None


def _differences(found: Any, expected: dict) -> str:
    """The fingerprint keys that differ, dotted, for the one-line error."""
    if not isinstance(found, dict):
        return "everything: no fingerprint"
    out = []
    for key in sorted(set(found) | set(expected)):
        a, b = found.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b)
            out += [f"{key}.{k}" for k in inner.split(", ") if k]
        elif a != b:
            out.append(key)
    return ", ".join(out)


def restore_params(workdir: str, like: Any, shardings: Any, field: str = "ema_params"
                   ) -> tuple[Any, int] | None:
    """`(state.<field>, step)` of the newest readable checkpoint in `workdir`, or None.

    For inference: reads one field of the state (the EMA params by default), never the
    optimizer moments, and moves nothing (an unreadable checkpoint is skipped with a
    warning). `like`/`shardings` describe the params tree.
    """
    path = paths.join(workdir, CHECKPOINTS)
    if not paths.agree(paths.isdir(path)):
        return None
    mngr = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
        create=False, read_only=True))
    try:
        for step in sorted(mngr.all_steps(), reverse=True):
            restored, error = _agreed_try(lambda: mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={field: _abstract(like, shardings)},
                    restore_args={field: jax.tree.map(
                        lambda x, s: ocp.ArrayRestoreArgs(
                            sharding=s, global_shape=x.shape, dtype=x.dtype),
                        like, shardings)},
                    partial_restore=True))))
            if error is None:
                return restored.state[field], int(step)
            # Skipped, never moved, for inference.
            logging.warning("checkpoint %d in %s is unreadable (%s); trying an older one",
                            step, path, str(error).splitlines()[0][:200])
    finally:
        mngr.close()
    return None


def _set_aside_unreadable(mngr: ocp.CheckpointManager, step: int, error: Exception) -> None:
    """Moves checkpoint `step` to `checkpoints-unreadable/` (process 0; all wait), kept for
    inspection. On gs:// the move is a copy and delete (see `paths.move`)."""
    directory = paths.path(mngr.directory)
    aside = paths.join(directory.parent, "checkpoints-unreadable",
                       f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if paths.is_writer():
        paths.move(directory / str(step), aside)
    paths.barrier(f"unreadable:{step}")
    mngr.reload()
    logging.warning("checkpoint %d is unreadable (%s); moved it to %s and trying an older "
                    "one", step, str(error).splitlines()[0][:200], aside)


def set_aside(workdir: str) -> None:
    """Moves an existing checkpoint folder out of the way (start_fresh); nothing is deleted.

    A local folder is renamed; a gs:// folder is copied and deleted (`paths.move`), so a
    move cut short leaves both, never neither.
    """
    path = paths.join(workdir, CHECKPOINTS)
    aside = paths.agree(bool(paths.listdir(path))) and \
        f"{path}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    if aside and paths.is_writer():
        paths.move(path, aside)
        logging.warning("start_fresh: moved the previous checkpoints to %s", aside)
    paths.barrier("set_aside")


def file_identity(path: str) -> dict[str, Any]:
    """A cheap identity of a weights file or folder for run fingerprints: the byte size
    and a sha256 of the first and last MiB of every file (the safetensors header and the
    tail of the data), so a different checkpoint at the same path is noticed."""
    def walk(p):  # epath refuses recursive globs (they could be thousands of GCS calls)
        return [f for c in sorted(p.iterdir(), key=str) for f in walk(c)] if p.is_dir() else [p]

    files = walk(paths.path(path))
    digest, size = hashlib.sha256(), 0
    for file in files:
        n = file.stat().length
        size += n
        with file.open("rb") as f:
            digest.update(f.read(1 << 20))
            if n > 2 << 20:
                f.seek(n - (1 << 20))
                digest.update(f.read())
    return {"bytes": size, "sha256_ends": digest.hexdigest()[:16]}
