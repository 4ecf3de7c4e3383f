"""Every file the project reads or writes, local or on a bucket (`gs://...`), and who writes it.

Paths go through `etils.epath` (what orbax and clu use), so a workdir, a cache folder or a
prompt file may be `gs://bucket/dir` as well as a local path; nothing here calls `os.path`
on a path a user may give. Local paths are made absolute (orbax needs that); URIs are kept.

Multi-host: on a pod every process runs the same program, but files shared by the run
(evaluation folders, image grids, results.md, world caches, moved checkpoint folders) are
written by process 0 only (`is_writer`); the others wait at `barrier` where they must read
what process 0 wrote, and decisions taken from the file system (does this file exist?) are
taken once by process 0 and broadcast (`agree`), so every process runs the same collectives.

Moving a folder (`move`): a local rename is atomic. A bucket has no folders and no rename:
epath renames a `gs://` folder by copying every object and deleting the originals (gcsfs
and tf.io.gfile both do), which is not atomic; a move cut short leaves both copies, and
nothing is lost (the next `move` of the same source goes to a new, timestamped name).
"""

from __future__ import annotations

import io
import os
from typing import Any

import jax
import numpy as np
from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for a URI (`gs://...`, `s3://...`), False for a local path."""
    return "://" in os.fspath(path)


def path(path: PathLike) -> epath.Path:
    """An `epath.Path`; a local path is made absolute (orbax requires absolute paths)."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...` as a string (kept a URI for a bucket)."""
    return os.fspath(path(base).joinpath(*parts))


def exists(p: PathLike) -> bool:
    return path(p).exists()


def isdir(p: PathLike) -> bool:
    return path(p).is_dir()


def listdir(p: PathLike) -> list[str]:
    """Names in folder `p` (sorted); [] when it does not exist."""
    folder = path(p)
    return sorted(c.name for c in folder.iterdir()) if folder.is_dir() else []


def makedirs(p: PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def read_text(p: PathLike) -> str:
    return read_bytes(p).decode("utf-8")


def write_bytes(p: PathLike, data: bytes) -> None:
    """Writes `data` to `p` whole: a crash never leaves a half-written file at `p`.

    Locally through a temporary file and a rename; a bucket object appears only once its
    upload completes, so there the object is written directly.
    """
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):
        target.write_bytes(data)
        return
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def write_text(p: PathLike, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def write_png(p: PathLike, image: Any) -> None:
    """Writes a (H, W, 3) uint8 array (or a PIL image) as a PNG file."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes(p, buffer.getvalue())


def move(src: PathLike, dst: PathLike) -> None:
    """Moves file or folder `src` to `dst` (see the module docstring for buckets)."""
    source, target = path(src), path(dst)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(source):
        os.rename(source, target)
        return
    try:
        source.rename(target)
    except (NotImplementedError, OSError):  # a backend without folder renames
        if source.is_dir():
            for child in source.iterdir():
                move(child, target / child.name)
            source.rmtree(missing_ok=True)
        else:
            source.copy(target)
            source.unlink()


def file_size(p: PathLike) -> int:
    return path(p).stat().length


# ----------------------------------------------------------------------------- multi-host


def is_writer() -> bool:
    """True on the process that writes shared files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes wait here (a no-op on one process): after process 0 wrote a file
    the others are about to read."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(value: bool) -> bool:
    """Process 0's `value` on every process (e.g. "does this file exist?")."""
    if jax.process_count() == 1:
        return bool(value)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(value))))


def any_process(value: bool) -> bool:
    """True on every process when `value` is True on any one (a local flag made global)."""
    if jax.process_count() == 1:
        return bool(value)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(value)))))
