"""Low-rank adapters (LoRA) for the Flux transformer, kept as their own small param tree.

For a targeted kernel W of shape (in..., out...) the adapter holds A (in..., r) and
B (r, out...) and the adapted kernel is

    W' = W + (alpha / r) * A @ B        (the product contracts r; shape (in..., out...))

so `x @ W' = x @ W + (alpha / r) * (x @ A) @ B`. Multi-dim kernels keep their dims: for
the qkv kernel (embed, 3, heads, head_dim) A is (embed, r) and B (r, 3, heads, head_dim);
for an attention output (heads, head_dim, embed) A is (heads, head_dim, r) and B
(r, embed). This is the same as flattening W to (prod(in), prod(out)), and A and B shard
like the kernel they adapt (A takes W's input axis names, B its output ones), so a tensor
split of the heads stays by whole heads.

B starts at zero, so the adapted model starts equal to the base. Training differentiates
only the adapters: `attach` puts each adapter beside its kernel and the model computes
`x @ W + (x @ A) @ B` (no merged kernel, no full-size gradient):

    loss(lora) = f(velocity(attach(base, lora, cfg), ...))     # base frozen

`merge` forms `W + (alpha / r) A @ B` for export.

The tree mirrors the model's module paths: `double_blocks_0/img_attn/qkv/{lora_a, lora_b}`
adapts `double_blocks_0/img_attn/qkv/kernel`. A `scan_blocks` model stacks its blocks
(`double_blocks/block/img_attn/qkv/kernel`, shape (layers, in..., out...)), and its
adapters stack the same way: A (layers, in..., r), B (layers, r, out...), layer i equal to
the per-block adapter of block i (same init), so `nn.scan` hands each block its own slice.
Targets are still matched against the per-block names; a stack is adapted whole.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from leapalign_jax.models.flux import is_stacked, kernel_in_dims, layer_names

Params = dict[str, Any]

# Regexes (full matches) over a kernel's module path, e.g. "double_blocks_3/img_attn/qkv":
# every attention and MLP projection of the double and single blocks.
DEFAULT_TARGETS = (
    r"double_blocks_\d+/(img|txt)_attn/(qkv|proj)",
    r"double_blocks_\d+/(img|txt)_mlp_(0|2)",
    r"single_blocks_\d+/linear1/(qkv|mlp)",
    r"single_blocks_\d+/linear2/(attn|mlp)",
)


def lora_config(**overrides: Any) -> ml_collections.ConfigDict:
    """LoRA knobs (keyword arguments override any of them).

    Attributes:
      rank: r, the inner width of every adapter.
      alpha: the update is scaled by alpha / rank (so changing the rank keeps its size).
      targets: regexes, each matched in full against a kernel's module path
        ("double_blocks_0/img_attn/qkv"); a kernel matching any of them is adapted.
      dropout: must be 0 (adapter dropout is not implemented).
    """
    c = ml_collections.ConfigDict()
    c.rank = 16
    c.alpha = 16.0
    c.targets = list(DEFAULT_TARGETS)
    c.dropout = 0.0
    c.update(overrides)
    return c


def _check_config(cfg: Any) -> None:
    if not isinstance(cfg.rank, int) or cfg.rank <= 0:
        raise ValueError(f"LoRA rank {cfg.rank!r} must be a positive integer; set lora.rank")
    if cfg.dropout != 0:
        raise ValueError(f"LoRA dropout {cfg.dropout} is not supported; set lora.dropout=0")
    if not cfg.targets:
        raise ValueError("LoRA targets is empty; set lora.targets to regexes over module "
                         f"paths, e.g. {DEFAULT_TARGETS[0]!r}")
    for pattern in cfg.targets:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"LoRA target {pattern!r} is not a valid regex ({err}); "
                             "fix lora.targets") from err


def _targets(params: Params, cfg: Any) -> dict[tuple[str, ...], tuple[tuple[str, ...], Any]]:
    """module path -> (kernel path, kernel leaf) for every kernel the targets match."""
    _check_config(cfg)
    flat = flax.traverse_util.flatten_dict(params)
    found = {}
    for path, leaf in flat.items():
        if path[-1] != "kernel":
            continue
        names = layer_names(path[:-1], _unboxed_shape(leaf)[0])
        hits = [any(re.fullmatch(pattern, name) for pattern in cfg.targets) for name in names]
        if all(hits):
            found[path[:-1]] = (path, leaf)
        elif any(hits):
            raise ValueError(f"LoRA targets {list(cfg.targets)} match only some layers of the "
                             f"stacked {'/'.join(path[:-1])}; a scan_blocks model adapts whole "
                             "stacks: match every block, or set scan_blocks=False")
    if not found:
        raise ValueError(f"LoRA targets {list(cfg.targets)} match no kernel; module paths "
                         "look like 'double_blocks_0/img_attn/qkv', fix lora.targets")
    return found


def _unboxed_shape(leaf: Any) -> tuple[int, ...]:
    return tuple(nn.meta.unbox(leaf).shape)


def _layer_dims(kernel_path: tuple[str, ...]) -> int:
    """1 for a stacked (`scan_blocks`) kernel's leading layer axis, else 0."""
    return int(is_stacked(kernel_path))


def _adapter_shapes(kernel_path: tuple[str, ...], shape: tuple[int, ...],
                    rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    lead = _layer_dims(kernel_path)
    n = lead + kernel_in_dims(kernel_path)
    return shape[:n] + (rank,), shape[:lead] + (rank,) + shape[n:]


def init_lora(params: Params, cfg: Any, rng: jax.Array) -> Params:
    """Adapters for every targeted kernel of `params`: A random, B zero.

    A ~ N(0, 1 / fan_in) (fan_in = the kernel's input width), drawn from `rng` folded with
    a hash of the per-block path, so an adapter's init does not depend on which others
    exist, nor on the layout (a stacked adapter is the stack of the per-block ones).

    Raises:
      ValueError: a bad config (rank, dropout, targets) or targets matching no kernel.
    """
    tree: Params = {}
    for module, (kernel_path, leaf) in sorted(_targets(nn.meta.unbox(params), cfg).items()):
        shape = _unboxed_shape(leaf)
        a_shape, b_shape = _adapter_shapes(kernel_path, shape, cfg.rank)
        lead = _layer_dims(kernel_path)
        layer_shape = a_shape[lead:]
        fan_in = math.prod(layer_shape[:-1])
        layers = [jax.random.normal(jax.random.fold_in(rng, zlib.crc32(name.encode())),
                                    layer_shape, jnp.float32) / math.sqrt(fan_in)
                  for name in layer_names(module, shape[0])]
        node = tree
        for name in module:
            node = node.setdefault(name, {})
        node["lora_a"] = jnp.stack(layers) if lead else layers[0]
        node["lora_b"] = jnp.zeros(b_shape, jnp.float32)
    return tree


def lora_abstract(abstract_params: Any, cfg: Any) -> Params:
    """Abstract adapters (`jax.ShapeDtypeStruct`s) boxed with logical axis names.

    `abstract_params` is the model's boxed abstract tree (`flux.abstract_params(config)`).
    A takes the kernel's input names plus None, B None plus its output names (a stacked
    adapter keeps the kernel's leading "layers" name on both), so
    `parallel.logical_shardings(lora_abstract(...), mesh)` shards each adapter like the
    kernel it adapts.
    """
    specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(abstract_params))
    tree: Params = {}
    for module, (kernel_path, leaf) in _targets(abstract_params, cfg).items():
        shape = _unboxed_shape(leaf)
        names = tuple(specs.get(kernel_path) or (None,) * len(shape))
        lead = _layer_dims(kernel_path)
        n = lead + kernel_in_dims(kernel_path)
        a_shape, b_shape = _adapter_shapes(kernel_path, shape, cfg.rank)
        box = lambda s, axes: nn.Partitioned(  # noqa: E731
            jax.ShapeDtypeStruct(s, jnp.float32), names=axes)
        node = tree
        for name in module:
            node = node.setdefault(name, {})
        node["lora_a"] = box(a_shape, names[:n] + (None,))
        node["lora_b"] = box(b_shape, names[:lead] + (None,) + names[n:])
    return tree


def lora_axes(abstract_params: Any, cfg: Any) -> Any:
    """The logical `PartitionSpec` of every adapter (see `lora_abstract`)."""
    return nn.get_partition_spec(lora_abstract(abstract_params, cfg))


def delta(lora_a: jax.Array, lora_b: jax.Array, alpha: float, layers: bool = False
          ) -> jax.Array:
    """(alpha / r) * A @ B contracting r: the update of a kernel (in..., out...), or of each
    layer of a stacked kernel (layers, in..., out...) when `layers`."""
    if layers:
        return jax.vmap(delta, (0, 0, None))(lora_a, lora_b, alpha)
    rank = lora_a.shape[-1]
    product = jnp.tensordot(lora_a, lora_b, axes=1, precision=jax.lax.Precision.HIGHEST)
    return (alpha / rank) * product


def _adapted(params: Params, lora_params: Params, cfg: Any):
    """(flat params, [(kernel path, A, B)]) after checking every adapter fits its kernel."""
    flat = dict(flax.traverse_util.flatten_dict(params))
    adapters = flax.traverse_util.flatten_dict(lora_params)
    out = []
    for module in sorted({path[:-1] for path in adapters}):
        kernel_path = module + ("kernel",)
        a, b = adapters.get(module + ("lora_a",)), adapters.get(module + ("lora_b",))
        if kernel_path not in flat or a is None or b is None:
            raise ValueError(f"LoRA adapter {'/'.join(module)} has no kernel in params (or "
                             "lacks lora_a / lora_b); init the adapters from these params")
        lead = _layer_dims(kernel_path)
        shape = tuple(a.shape[:-1]) + tuple(b.shape[lead + 1:])
        if (shape != tuple(flat[kernel_path].shape) or a.shape[-1] != b.shape[lead]
                or a.shape[:lead] != b.shape[:lead]):
            raise ValueError(f"LoRA adapter {'/'.join(module)}: A @ B has shape "
                             f"{shape}, the kernel {tuple(flat[kernel_path].shape)}; init the "
                             "adapters from these params")
        out.append((kernel_path, a, b))
    return flat, out


def attach(params: Params, lora_params: Params, cfg: Any) -> Params:
    """`params` with each adapter placed beside its kernel, B scaled by alpha / r.

    The Flux `DenseGeneral` then computes `x @ W + (x @ A) @ B` without forming the
    merged kernel, so differentiating `velocity(attach(base, lora, cfg), ...)` with respect
    to `lora` touches only rank-r buffers. This is how the trainer runs a LoRA world
    (`World.assemble`).

    Raises:
      ValueError: an adapter whose kernel is not in `params` or whose shapes do not fit it.
    """
    flat, adapted = _adapted(params, lora_params, cfg)
    for kernel_path, a, b in adapted:
        module = kernel_path[:-1]
        flat[module + ("lora_a",)] = a
        flat[module + ("lora_b",)] = (cfg.alpha / a.shape[-1]) * b
    return flax.traverse_util.unflatten_dict(flat)


def merge(params: Params, lora_params: Params, cfg: Any) -> Params:
    """`params` with every adapted kernel replaced by `W + (alpha / r) * A @ B`.

    Pure and jittable; kernels keep their dtype. `task=export` writes merged params with
    `weights.flux.save_flux_bfl` / `save_flux_diffusers`.

    Raises:
      ValueError: an adapter whose kernel is not in `params` or whose shapes do not fit it.
    """
    flat, adapted = _adapted(params, lora_params, cfg)
    for kernel_path, a, b in adapted:
        kernel = flat[kernel_path]
        update = delta(a, b, cfg.alpha, layers=bool(_layer_dims(kernel_path)))
        flat[kernel_path] = (kernel + update).astype(kernel.dtype)
    return flax.traverse_util.unflatten_dict(flat)


def count_params(lora_params: Params) -> int:
    """Number of trainable adapter parameters."""
    return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(lora_params))
