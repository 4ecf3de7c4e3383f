"""Saving and loading the shapes world's parameter trees (flax msgpack), in one place."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import serialization


def save_params(path: str, tree: Any) -> None:
    """Writes `tree` atomically: a crash mid-write never leaves a half file at `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(serialization.to_bytes(jax.device_get(tree)))
    os.replace(tmp, path)


def load_params(path: str, like: Any) -> Any:
    """Reads a tree saved by `save_params`, checked against the structure of `like`.

    Raises FileNotFoundError for a missing file and ValueError for a corrupt one or one
    whose structure or shapes differ from `like` (e.g. written with other model knobs).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no saved params at {path}; check the path, or build and "
                                "save them first with save_params")
    with open(path, "rb") as f:
        data = f.read()
    try:
        tree = serialization.from_bytes(like, data)
    except Exception as e:  # noqa: BLE001 - msgpack raises many kinds on corrupt input
        raise ValueError(f"{path} is corrupt or of another model ({type(e).__name__}); "
                         "delete it to rebuild") from None
    mismatched = [jax.tree_util.keystr(k) for (k, a), b in zip(
        jax.tree_util.tree_flatten_with_path(like)[0], jax.tree.leaves(tree))
        if np.shape(a) != np.shape(b)]
    if mismatched:
        raise ValueError(f"{path} does not match the model: shapes differ at "
                         f"{mismatched[:5]}; delete it to rebuild")
    return tree
