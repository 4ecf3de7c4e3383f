"""The shapes world's models as shipped with the package, so a first run skips the build.

`shipped_models/` holds the default world's four cached files (autoencoder, contrastive
reward, generator, tuned reward; flax msgpack, named by the hash of their knobs as in
`cache_dir`) and `manifest.json` with each file's sha256 and the command that rebuilt
them. A world whose knobs match a shipped file's name loads that file instead of
building it; any other knobs build as before. `python -m leapalign_jax.toy.rebuild
--check` rebuilds them from scratch and compares bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable

from leapalign_jax.toy import cache

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped_models")
MANIFEST = os.path.join(SHIPPED_DIR, "manifest.json")


def manifest() -> dict[str, Any]:
    """{"files": {name: {"sha256", "bytes"}}, ...}; empty files when nothing is shipped."""
    if not os.path.isfile(MANIFEST):
        return {"files": {}}
    with open(MANIFEST, encoding="utf-8") as f:
        return json.load(f)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(name: str, like: Callable[[], Any]) -> Any | None:
    """The shipped tree called `name`, or None when none is shipped or it is damaged
    (a warning says which; the caller then builds it)."""
    entry = manifest()["files"].get(name)
    path = os.path.join(SHIPPED_DIR, name)
    if entry is None or not os.path.isfile(path):
        return None
    if sha256(path) != entry["sha256"]:
        logging.warning("%s differs from its manifest (a Git LFS pointer or an edited file?); "
                        "building it instead", path)
        return None
    logging.info("using the shipped %s", name)
    return cache.load_params(path, like())
