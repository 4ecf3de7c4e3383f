"""Reading checkpoints tensor by tensor: safetensors files, sharded folders, JSON configs.

Every loader in `leapalign_jax.weights` reads through here, so a missing, truncated or
mis-shaped file gives the same kind of one-line error whatever the model family, and no
loader ever needs the whole checkpoint in host memory: `Tensors.read(key)` memory-maps one
tensor at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

Shapes = dict[str, tuple[int, ...]]


@contextlib.contextmanager
def open_safetensors(file: str) -> Iterator[Any]:
    """A numpy `safe_open` handle; FileNotFoundError / ValueError name the file and the fix."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"weights file not found: {file}")
    try:
        handle = safe_open(file, framework="numpy")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err}); it is truncated "
                         "or corrupt, re-download or re-convert it") from err
    with handle as h:
        yield h


class Tensors:
    """Lazily readable tensors spread over one or more safetensors files.

    Attributes:
      shapes: key -> torch-layout shape, read from the headers only.
      dtypes: key -> safetensors dtype name ("F32", "BF16", "F16", ...).
    """

    def __init__(self, files: list[str], stack: contextlib.ExitStack):
        self.where: dict[str, tuple[Any, str]] = {}
        self.shapes: Shapes = {}
        self.dtypes: dict[str, str] = {}
        for file in files:
            handle = stack.enter_context(open_safetensors(file))
            for key in handle.keys():
                meta = handle.get_slice(key)
                self.where[key] = (handle, file)
                self.shapes[key] = tuple(meta.get_shape())
                self.dtypes[key] = meta.get_dtype()

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a numpy array in its stored dtype (bf16 as ml_dtypes)."""
        handle, file = self.where[key]
        try:
            return handle.get_tensor(key)
        except (SafetensorError, TypeError, ValueError) as err:
            # Older safetensors cannot hand bf16 to numpy; go through JAX for those.
            if self.dtypes[key] != "BF16":
                raise ValueError(f"{file}: cannot read tensor {key} ({err}); the file may be "
                                 "corrupt, re-download it") from err
            with safe_open(file, framework="flax") as f:
                return np.asarray(f.get_tensor(key))


def read_json(file: str) -> dict[str, Any]:
    """A JSON file as a dict; FileNotFoundError / ValueError name the file and the fix."""
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found; the checkpoint folder is incomplete, "
                                "re-download it")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err}); re-download it") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object; re-download it")
    return data


def weight_files(folder: str, single: str, index: str) -> list[str]:
    """The safetensors files of a (possibly sharded) folder: `index` lists the shards,
    otherwise the one file `single`."""
    index_file = os.path.join(folder, index)
    if os.path.isfile(index_file):
        try:
            weight_map = read_json(index_file)["weight_map"]
        except KeyError as err:
            raise ValueError(f"{index_file}: not a valid safetensors index (no weight_map); "
                             "re-download it") from err
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    single_file = os.path.join(folder, single)
    if os.path.isfile(single_file):
        return [single_file]
    raise FileNotFoundError(f"neither {single} nor {index} in {folder}; save the model with "
                            "safe_serialization=True (safetensors)")


def check_shapes(source: str, found: Shapes, expected: Shapes, what: str, hint: str) -> None:
    """One ValueError listing every missing, unexpected or mis-shaped tensor.

    `what` names the model the shapes were derived from, `hint` the likely fix.
    """
    problems = []
    for key, shape in expected.items():
        if key not in found:
            problems.append(f"  missing {key}: expected {shape}")
        elif tuple(found[key]) != tuple(shape):
            problems.append(f"  wrong shape {key}: expected {shape}, found {found[key]}")
    problems += [f"  unexpected {key}: found {found[key]}" for key in found if key not in expected]
    if problems:
        raise ValueError(f"{source}: {len(problems)} tensor(s) do not fit {what}; {hint}:\n"
                         + "\n".join(problems))


def float_dtype(dtype: Any) -> np.dtype:
    """np.float32 / "float32" / "bfloat16" / ml_dtypes.bfloat16 -> a numpy float dtype."""
    if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
        dtype = ml_dtypes.bfloat16
    dtype = np.dtype(dtype)
    if dtype.kind != "f" and dtype != np.dtype(ml_dtypes.bfloat16):
        raise ValueError(f"dtype {dtype} is not a float type; use np.float32 or "
                         "ml_dtypes.bfloat16")
    return dtype


def cast(array: np.ndarray, dtype: np.dtype, transpose: bool = False) -> np.ndarray:
    """`array` (optionally transposed) copied into a fresh contiguous array of `dtype`."""
    if transpose:
        array = array.T
    out = np.empty(array.shape, dtype)
    out[...] = array
    return out


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """`tree[path[0]][path[1]]... = value`, creating the nested dicts on the way."""
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


# path of a Flax leaf -> zero-argument reader of that leaf in Flax layout (stored dtype)
Readers = dict[tuple[str, ...], Callable[[], np.ndarray]]


def materialize(readers: Readers, dtype: Any) -> dict[str, Any]:
    """Reads every leaf, one tensor at a time, into a nested param dict of `dtype`.

    Loaders describe a checkpoint as `Readers` so that a sharded loader can instead call
    each reader inside `jax.make_array_from_callback` and never hold the whole model.
    """
    dtype = float_dtype(dtype)
    tree: dict[str, Any] = {}
    for path, read in readers.items():
        set_path(tree, path, cast(read(), dtype))
    return tree
