"""Streaming, sharded loading: checkpoint tensors straight onto their device shards.

A loader in `leapalign_jax.weights` describes a checkpoint as `Readers` (Flax leaf path ->
zero-argument reader of that leaf in Flax layout). `load_sharded` builds every leaf with
`jax.make_array_from_callback` under the leaf's logical sharding (`parallel.
logical_shardings` of the model's boxed abstract params), one tensor at a time: the
current tensor is read and cast once, each addressable device copies its slice, and the
host copy is dropped before the next tensor is read. Host memory therefore grows with the
largest tensor, never with the model, and no device ever holds a full copy of a sharded
leaf (on a pod each process reads only the tensors' bytes and builds only its shards).
A model that stacks its layers (a `scan_blocks` Flux) is filled layer by layer the same
way, each layer's shards written into the stacked leaf in place.

The dtype is an explicit argument per component: the trained transformer's master params
default to float32 (a bf16 file is upcast), frozen components (T5, VAE) may ask for
bfloat16. A file is never narrowed unless the caller says so.

    mesh = parallel.make_mesh((1, 8, 1))
    config, params = load_flux_sharded("FLUX.1-dev", mesh)              # fp32, FSDP
    t5_config, t5 = load_t5_sharded("FLUX.1-dev", mesh, dtype="bfloat16")
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import numpy as np
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from leapalign_jax import parallel
from leapalign_jax.models import autoencoder as vae_model
from leapalign_jax.models import flux as flux_model
from leapalign_jax.models import t5 as t5_model
from leapalign_jax.weights.autoencoder import autoencoder_readers, read_autoencoder_config
from leapalign_jax.weights.files import Readers, Tensors, cast, float_dtype, weight_files
from leapalign_jax.weights.flux import flux_readers
from leapalign_jax.weights.t5 import read_t5_config, t5_readers

Params = dict[str, Any]
Rules = Sequence[tuple[str, Any]]


def leaf_shardings(abstract: Any, mesh: Mesh, rules: Rules = parallel.DEFAULT_RULES
                   ) -> dict[tuple[str, ...], jax.sharding.NamedSharding]:
    """Flax leaf path -> NamedSharding of each leaf of a boxed abstract param tree."""
    shardings = parallel.logical_shardings(abstract, mesh, rules)
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(shardings))


Stacking = Callable[[tuple[str, ...]], "tuple[tuple[str, ...], int] | None"]


def _targets(source: str, readers: Readers, shapes: dict[tuple[str, ...], Any],
             stacked: Stacking | None) -> dict[tuple[str, ...], tuple[tuple[str, ...], Any]]:
    """Reader path -> (model leaf path, layer of a stacked leaf or None), after checking
    that the readers cover every leaf (every layer of a stacked one) exactly."""
    where = {p: ((stacked(p) if stacked else None) or (p, None)) for p in readers}
    covered: dict[tuple[str, ...], set] = {}
    unexpected = []
    for path, (leaf, layer) in where.items():
        if leaf not in shapes or (layer is not None and not 0 <= layer < shapes[leaf].shape[0]):
            unexpected.append("/".join(path))
        else:
            covered.setdefault(leaf, set()).add(layer)
    missing = ["/".join(p) for p in shapes if p not in covered]
    for leaf, layers in covered.items():
        if None not in layers:  # a stacked leaf: every layer needs its reader
            missing += [f"{'/'.join(leaf)}[{i}]" for i in range(shapes[leaf].shape[0])
                        if i not in layers]
    if missing or unexpected:
        raise ValueError(f"{source}: the checkpoint's leaves do not match the model "
                         f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); "
                         "pass the abstract params of the model these readers were built for")
    return where


def load_sharded(readers: Readers, abstract: Any, mesh: Mesh,
                 rules: Rules = parallel.DEFAULT_RULES, dtype: Any = np.float32, *,
                 source: str = "checkpoint", stacked: Stacking | None = None) -> Params:
    """Builds the param tree of `readers` directly on `mesh`, one tensor at a time.

    Args:
      readers: Flax leaf path -> reader (Flax layout, any float dtype).
      abstract: `jax.eval_shape` of the model's init with boxed (logically named) leaves,
        e.g. `models.flux.abstract_params(config)`; it fixes shapes and shardings.
      mesh, rules: the device mesh and logical-axis rules (`parallel.DEFAULT_RULES`).
      dtype: dtype of every built leaf (float32 default; "bfloat16" for frozen parts).
      source: names the checkpoint in errors.
      stacked: for a model that stacks its layers on a leading axis (a `scan_blocks`
        Flux: `models.flux.stacked_path`), maps a reader's per-layer path to (the stacked
        leaf's path, the layer). Each layer is built on its shards and written into a
        donated stacked buffer, so beyond the model the host holds one layer's tensor and
        each device one layer's shard.

    Returns:
      The plain (unboxed) nested param dict of global `jax.Array`s, each laid out by its
      logical sharding.

    Raises:
      ValueError: the readers' leaves or a tensor's shape do not match `abstract`.
    """
    dtype = float_dtype(dtype)
    shapes = flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.meta.unbox(abstract)))
    shardings = leaf_shardings(abstract, mesh, rules)
    where = _targets(source, readers, shapes, stacked)
    flat = {}
    for path, read in readers.items():  # readers' order: parts of one tensor together
        leaf, layer = where[path]
        shape, sharding = tuple(shapes[leaf].shape), shardings[leaf]
        if layer is None:
            flat[leaf] = jax.make_array_from_callback(
                shape, sharding, _shard_reader(read, shape, dtype, source, path))
            continue
        layer_sharding = NamedSharding(mesh, P(*sharding.spec[1:]))
        part = jax.make_array_from_callback(
            shape[1:], layer_sharding, _shard_reader(read, shape[1:], dtype, source, path))
        if leaf not in flat:
            flat[leaf] = jax.jit(lambda s=shape: jnp.zeros(s, dtype), out_shardings=sharding)()
        flat[leaf] = _set_layer(flat[leaf], part, np.int32(layer))
    return flax.traverse_util.unflatten_dict(flat)


# Writes one layer into its stacked leaf in place (the buffer is donated).
_set_layer = jax.jit(lambda stack, part, i: stack.at[i].set(part), donate_argnums=0)


def _shard_reader(read: Callable[[], np.ndarray], shape: tuple[int, ...], dtype: np.dtype,
                  source: str, path: tuple[str, ...]) -> Callable[[Any], np.ndarray]:
    """The `make_array_from_callback` callback of one leaf: reads and casts the tensor on
    the first call, hands each device a fresh copy of its slice (so a device buffer that
    aliases host memory keeps only its shard alive), and keeps the tensor only while this
    leaf is being built (the closure dies with the callback)."""
    current: list[np.ndarray] = []

    def callback(index: Any) -> np.ndarray:
        if not current:
            array = read()
            if tuple(array.shape) != shape:
                raise ValueError(f"{source}: {'/'.join(path)} has shape {tuple(array.shape)}, "
                                 f"the model expects {shape}; the checkpoint does not fit "
                                 "the config")
            current.append(cast(array, dtype))
        return np.array(current[0][index], copy=True)

    return callback


# ----------------------------------------------------------------------------- components


def load_flux_sharded(path: str | os.PathLike, mesh: Mesh, rules: Rules = parallel.DEFAULT_RULES,
                      *, dtype: Any = np.float32, axes_dim: tuple[int, ...] | None = None,
                      scan_blocks: bool = False) -> tuple[flux_model.FluxConfig, Params]:
    """`load_flux` onto `mesh`: float32 master params by default, whatever the file holds.
    With `scan_blocks` the blocks stream straight into the stacked layout (the returned
    config has scan_blocks=True)."""
    with contextlib.ExitStack() as stack:
        config, readers = flux_readers(path, stack, axes_dim=axes_dim)
        config = dataclasses.replace(config, scan_blocks=scan_blocks)
        params = load_sharded(readers, flux_model.abstract_params(config), mesh, rules, dtype,
                              source=os.fspath(path),
                              stacked=flux_model.stacked_path if scan_blocks else None)
    return config, params


def t5_folder(path: str | os.PathLike) -> str:
    """The folder holding the T5 config.json: `path` or its `text_encoder_2/`."""
    path = os.fspath(path)
    sub = os.path.join(path, "text_encoder_2")
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(sub):
        return sub
    return path


def load_t5_sharded(path: str | os.PathLike, mesh: Mesh, rules: Rules = parallel.DEFAULT_RULES,
                    *, dtype: Any = np.float32) -> tuple[t5_model.T5Config, Params]:
    """`load_t5` onto `mesh` (T5-XXL split like the transformer: FSDP over d_model, heads
    and d_ff over "tensor"). Pass dtype="bfloat16" for the frozen encoder."""
    config = read_t5_config(path)
    where = t5_folder(path)
    with contextlib.ExitStack() as stack:
        tensors = Tensors(weight_files(where, "model.safetensors",
                                       "model.safetensors.index.json"), stack)
        readers = t5_readers(tensors, config, source=where)
        params = load_sharded(readers, t5_model.abstract_t5_params(config), mesh, rules, dtype,
                              source=where)
    return config, params


def load_autoencoder_sharded(path: str | os.PathLike, mesh: Mesh,
                             rules: Rules = parallel.DEFAULT_RULES, *, dtype: Any = np.float32,
                             norm_num_groups: int | None = None
                             ) -> tuple[vae_model.AutoencoderConfig, Params]:
    """`load_autoencoder` onto `mesh` (conv kernels split over their channels)."""
    config = read_autoencoder_config(path, norm_num_groups=norm_num_groups)
    with contextlib.ExitStack() as stack:
        readers = autoencoder_readers(path, stack, config)
        params = load_sharded(readers, vae_model.abstract_params(config), mesh, rules, dtype,
                              source=os.fspath(path))
    return config, params
