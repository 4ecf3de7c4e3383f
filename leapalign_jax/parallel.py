"""Device mesh, logical-axis rules and shardings.

Every kernel in the models carries logical axis names ("embed", "mlp", "heads"); one table
of rules maps them to the mesh axes ("data", "fsdp", "tensor"). FSDP versus tensor
parallelism is therefore a config change, and one device is simply the 1x1x1 mesh.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every data-parallel axis, fsdp-major. The order avoids an XLA
# SPMD-partitioner miscompile (jax 0.10.2, Shardy and GSPMD alike): with the batch over
# ("data", "fsdp"), data > 1 and fsdp == tensor > 1, a row-parallel matmul (kernel
# P("tensor", "fsdp")) with a tensor-split output swaps batch rows between devices; see
# benchmarks/xla_spmd_repro.py. Which batch rows a device holds is otherwise immaterial.
BATCH_AXES = ("fsdp", "data")

# logical name -> mesh axis (or None = replicated). Weights are split along their model
# width by FSDP and along heads / MLP width by tensor parallelism; a head is never split
# ("kv" is the head dim). Activations: batch over the data-parallel axes, tokens ("length")
# and the residual width ("act_embed") unsplit, heads / MLP columns over "tensor".
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("length", None),
    ("act_embed", None),
    ("layers", None),  # the stacked block axis of a `scan_blocks` Flux
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; one entry of `shape` may be -1 (all the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    if len(shape) != 3:
        raise ValueError(f"mesh shape {shape} must have 3 entries (data, fsdp, tensor)")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: use positive sizes and at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices but "
            f"{len(devices)} are present; set config.mesh.shape to match (e.g. [-1, 1, 1])")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes that do not divide their dimension (tiny test models, odd widths)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep = []
        for name in names:
            if dim % (mesh.shape[name] * math.prod(mesh.shape[k] for k in keep)) == 0:
                keep.append(name)
        fitted.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of (possibly `nn.Partitioned`-boxed) abstract arrays.

    `abstract_tree` usually comes from `jax.eval_shape(model.init, ...)` or from
    `jax.eval_shape` of a train-state constructor over boxed params; leaves without logical
    names are replicated. The result has the structure of the *unboxed* tree.
    """
    logical_specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    shapes = nn.meta.unbox(abstract_tree)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, _fit(spec, tuple(leaf.shape), mesh)),
        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data-parallel mesh axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Places a host batch (global arrays, batch-first) on the mesh.

    Every process holds the same global batch (worlds draw it deterministically from the
    step), and each device takes its slice, so the same call serves one host and a
    multi-host pod. Leaves whose leading dimension does not divide the data-parallel
    size are replicated.
    """
    n = data_parallel_size(mesh)

    def put(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh) if x.ndim and x.shape[0] % n == 0 else replicated(mesh)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def maybe_initialize_distributed() -> None:
    """Joins a multi-host job (TPU pod slice / multi-node GPU) when one is detected.

    On TPU VMs `jax.distributed.initialize()` discovers the coordinator by itself; on a
    single host it is skipped so laptops and CI run unchanged.
    """
    import os
    multi = any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS",
                                          "SLURM_NTASKS"))
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host or single-device arrays (PRNG keys included) as copies on every device of
    `mesh`, which may span processes; every process passes the same values.

    `jax.device_put` refuses a sharding with devices of other processes for an array that
    already lives on a device, so each leaf is rebuilt from its host copy.
    """
    sharding = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def place(tree: Any, shardings: Any) -> Any:
    """`tree`'s arrays on `shardings` (a matching tree); arrays already there are kept.

    Host arrays are built shard by shard from their host copy (every process passes the
    same values, as `replicate` asks); arrays on devices are resharded by a jitted copy.
    """
    def put(x, sharding):
        if isinstance(x, jax.Array):
            if x.sharding == sharding:
                return x
            if not x.is_fully_addressable:
                return jax.jit(lambda a: a, out_shardings=sharding)(x)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)
