"""Rebuilds the shipped shapes-world models from scratch and compares them bit for bit.

    python -m leapalign_jax.toy.rebuild --check              # ~40 min on 2 CPU cores
    python -m leapalign_jax.toy.rebuild --check --out DIR    # keep the rebuilt files in DIR
    python -m leapalign_jax.toy.rebuild --update [--out DIR] # ship what is built in DIR

`--check` builds the default world's autoencoder, reward model, generator and tuned
reward into an empty folder (never reading the shipped files) and prints, for each,
whether its sha256 equals the manifest's and, if not, the largest difference of any
parameter. It exits 1 when a file differs. The build is deterministic for a given
machine and XLA version; another CPU family may round differently, and a one-ulp
difference grows over training.
`--update` copies the files built in `--out` (building what is missing) into
`leapalign_jax/toy/shipped_models/` and rewrites the manifest: for when the world's
default knobs change.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import serialization

from leapalign_jax import paths
from leapalign_jax.toy import shipped
from leapalign_jax.toy.world import build_models, model_files, shapes_config

COMMAND = "python -m leapalign_jax.toy.rebuild --check"


def largest_difference(a_path: str, b_path: str) -> float:
    """Max |a - b| over all parameters of two msgpack trees of one structure."""
    a, b = (serialization.msgpack_restore(paths.read_bytes(p)) for p in (a_path, b_path))
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def ship(cache_dir: str, wc: ml_collections.ConfigDict) -> dict[str, Any]:
    """Copies `wc`'s model files from `cache_dir` into `shipped.SHIPPED_DIR`, removes other
    shipped models and writes the manifest; returns it."""
    names = model_files(wc).values()
    os.makedirs(shipped.SHIPPED_DIR, exist_ok=True)
    for old in os.listdir(shipped.SHIPPED_DIR):
        if old.endswith(".msgpack") and old not in names:
            os.remove(os.path.join(shipped.SHIPPED_DIR, old))
    files = {}
    for name in names:
        path = os.path.join(shipped.SHIPPED_DIR, name)
        shutil.copyfile(os.path.join(cache_dir, name), path)
        files[name] = {"sha256": shipped.sha256(path), "bytes": os.path.getsize(path)}
    knobs = {k: v for k, v in wc.to_dict().items() if k not in ("cache_dir", "prebuilt")}
    record = {"files": files, "rebuild": COMMAND, "knobs": knobs,
              "built_with": {"jax": jax.__version__, "machine": platform.machine()}}
    with open(shipped.MANIFEST, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    return record


def compare(cache_dir: str, wc: ml_collections.ConfigDict) -> tuple[int, list[str]]:
    """(number of files that differ from the shipped ones, a line per file)."""
    expected = shipped.manifest()["files"]
    differs, lines = 0, []
    for kind, name in model_files(wc).items():
        built = os.path.join(cache_dir, name)
        if name not in expected:
            lines.append(f"{kind}: {name} is not shipped (the default knobs changed?); "
                         "run --update to ship it")
            differs += 1
        elif shipped.sha256(built) == expected[name]["sha256"]:
            lines.append(f"{kind}: {name} identical (sha256 {expected[name]['sha256'][:16]})")
        else:
            diff = largest_difference(built, os.path.join(shipped.SHIPPED_DIR, name))
            lines.append(f"{kind}: {name} DIFFERS: largest parameter difference {diff:.3g}")
            differs += 1
    return differs, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="rebuild and compare with the manifest")
    mode.add_argument("--update", action="store_true", help="ship the models built in --out")
    parser.add_argument("--out", default="", help="local folder to build into (default: a "
                        "new temporary one); --check needs it empty or absent")
    args = parser.parse_args(argv)

    wc = shapes_config()
    wc.prebuilt = False
    wc.cache_dir = args.out or tempfile.mkdtemp(prefix="shapes-rebuild-")
    if args.check and os.path.isdir(wc.cache_dir) and os.listdir(wc.cache_dir):
        print(f"error: --out {wc.cache_dir} is not empty; --check must build from scratch "
              "into an empty or new folder", file=sys.stderr)
        return 2
    os.makedirs(wc.cache_dir, exist_ok=True)
    print(f"building the default shapes world into {wc.cache_dir}", flush=True)
    build_models(wc)
    if args.update:
        record = ship(wc.cache_dir, wc)
        print(f"shipped {len(record['files'])} files to {shipped.SHIPPED_DIR}")
        return 0
    differs, lines = compare(wc.cache_dir, wc)
    print("\n".join(lines))
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
