"""Saving and loading the shapes world's parameter trees (flax msgpack), in one place.

Paths go through `leapalign_jax.paths`, so a cache folder may be local or gs://.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import serialization

from leapalign_jax import paths


def save_params(path: str, tree: Any) -> None:
    """Writes `tree` atomically: a crash mid-write never leaves a half file at `path`."""
    paths.write_bytes(path, serialization.to_bytes(jax.device_get(tree)))


def load_params(path: str, like: Any) -> Any:
    """Reads a tree saved by `save_params`, checked against the structure of `like`.

    Raises FileNotFoundError for a missing file and ValueError for a corrupt one or one
    whose structure or shapes differ from `like` (e.g. written with other model knobs).
    """
    if not paths.exists(path):
        raise FileNotFoundError(f"no saved params at {path}; check the path, or build and "
                                "save them first with save_params")
    data = paths.read_bytes(path)
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
