"""Flux transformer checkpoints -> Flax params for `leapalign_jax.models.flux.Flux`.

Two layouts are read, tensor by tensor, with `safetensors.safe_open(framework="numpy")`:

- a diffusers `transformer/` folder (`config.json` + one or sharded
  `diffusion_pytorch_model*.safetensors`), or the pipeline folder holding it;
- a Black Forest Labs single file (`flux1-dev.safetensors`), whose config is inferred from
  tensor shapes.

The Flax tree mirrors the BFL names (`double_blocks.3.img_attn.qkv.weight` is
`double_blocks_3/img_attn/qkv/kernel`, transposed from torch's (out, in) and reshaped to
the model's multi-dim kernels, e.g. qkv (embed, 3, heads, head_dim)). The single block's
fused `linear1` / `linear2` are stored as two Flax leaves each (`linear1/qkv` +
`linear1/mlp` along torch's out dim, `linear2/attn` + `linear2/mlp` along its in dim).
diffusers splits q, k and v (and the single-block MLP input) into separate linears and
orders the final adaLN chunks (scale, shift) where BFL has (shift, scale); both are undone
here. `save_flux_bfl` and `save_flux_diffusers` write the inverse mappings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import numpy as np
from safetensors.numpy import save_file

from leapalign_jax.models.flux import FluxConfig, abstract_params, kernel_in_dims, stack_blocks
from leapalign_jax.weights.files import (Readers, Shapes, Tensors, check_shapes, float_dtype,
                                         materialize, read_json, weight_files)

Params = dict[str, Any]

_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_HINT = ("wrong model family (not a FLUX.1 transformer?) or a truncated / partially "
         "converted file; check the checkpoint")

# BFL module -> diffusers module(s); several sources are concatenated along torch's out dim.
_DIFFUSERS_TOP = {
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],  # (scale, shift) -> (shift, scale)
}
_DIFFUSERS_DOUBLE = {
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.norm.query_norm": ["attn.norm_q"],
    "img_attn.norm.key_norm": ["attn.norm_k"],
    "txt_attn.norm.query_norm": ["attn.norm_added_q"],
    "txt_attn.norm.key_norm": ["attn.norm_added_k"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
}
_DIFFUSERS_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "norm.query_norm": ["attn.norm_q"],
    "norm.key_norm": ["attn.norm_k"],
    "modulation.lin": ["norm.linear"],
}
_SWAPPED = "final_layer.adaLN_modulation.1"


# ----------------------------------------------------------------------------- naming

# Single-block BFL modules stored as several Flax modules, in BFL order, and the torch
# axis they are joined along (linear1: out rows [qkv | mlp]; linear2: in columns [attn | mlp]).
_FUSED = {"linear1": (0, ("qkv", "mlp")), "linear2": (1, ("attn", "mlp"))}


class _Part(NamedTuple):
    """One Flax leaf of a BFL tensor: its path, Flax shape and input-dim count."""
    path: tuple[str, ...]
    shape: tuple[int, ...]
    in_dims: int  # leading kernel dims that form torch's in dim; 0 for biases / norms


class _Tensor(NamedTuple):
    """A BFL tensor: its torch shape and the Flax leaves joined along `axis` to make it."""
    shape: tuple[int, ...]
    parts: tuple[_Part, ...]
    axis: int


def _bfl_key(path: tuple[str, ...]) -> str:
    """("double_blocks_3", "img_mlp_0", "kernel") -> "double_blocks.3.img_mlp.0.weight";
    ("single_blocks_0", "linear1", "qkv", "kernel") -> "single_blocks.0.linear1.weight"."""
    *modules, leaf = path
    if len(modules) == 3 and modules[0].startswith("single_blocks_") and modules[1] in _FUSED:
        modules = modules[:2]
    modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join(modules + ["weight" if leaf == "kernel" else leaf])


def _torch_shape(part: _Part) -> tuple[int, ...]:
    """Torch layout of one part: a kernel (in..., out...) is (prod(out), prod(in))."""
    if part.in_dims == 0:
        return (int(np.prod(part.shape)),) if part.shape else ()
    n = part.in_dims
    return int(np.prod(part.shape[n:])), int(np.prod(part.shape[:n]))


def _bfl_layout(config: FluxConfig) -> dict[str, _Tensor]:
    """Every BFL tensor of `config` and the Flax leaves it is made of."""
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract_params(config)))
    grouped: dict[str, list[_Part]] = {}
    for path, leaf in flat.items():
        in_dims = kernel_in_dims(path) if path[-1] == "kernel" else 0
        grouped.setdefault(_bfl_key(path), []).append(_Part(path, tuple(leaf.shape), in_dims))
    layout = {}
    for key, parts in grouped.items():
        axis = 0
        if key.startswith("single_blocks.") and key.split(".")[2] in _FUSED:
            fused_axis, order = _FUSED[key.split(".")[2]]
            parts.sort(key=lambda p: order.index(p.path[2]))
            axis = fused_axis if parts[0].in_dims else 0  # biases join along their one dim
        shapes = [_torch_shape(p) for p in parts]
        shape = list(shapes[0])
        shape[axis] = sum(sh[axis] for sh in shapes)
        layout[key] = _Tensor(tuple(shape), tuple(parts), axis)
    return layout


def bfl_shapes(config: FluxConfig) -> Shapes:
    """Every tensor of a BFL checkpoint for `config`: key -> torch-layout shape."""
    return {key: t.shape for key, t in _bfl_layout(config).items()}


def _join_to_torch(tensor: _Tensor, flat: dict[tuple[str, ...], Any]) -> np.ndarray:
    """The inverse of `flux_readers`' split: Flax leaves -> one torch-layout array."""
    pieces = []
    for part in tensor.parts:
        leaf = np.asarray(flat[part.path])
        if part.in_dims:
            leaf = leaf.reshape(_torch_shape(part)[::-1]).T
        pieces.append(leaf.reshape(_torch_shape(part)))
    out = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=tensor.axis)
    return np.ascontiguousarray(out)


def _torch_tensors(config: FluxConfig, params: Params, what: str) -> dict[str, np.ndarray]:
    """Flax params -> BFL-named torch-layout arrays, after checking the tree fits config."""
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(params))
    layout = _bfl_layout(config)
    expected = {part.path: part.shape for t in layout.values() for part in t.parts}
    check_shapes(what, {"/".join(k): tuple(np.shape(v)) for k, v in flat.items()},
                 {"/".join(k): v for k, v in expected.items()},
                 f"Flux(hidden {config.hidden_size}, depth {config.depth}+"
                 f"{config.depth_single_blocks}, guidance {config.guidance_embed})",
                 "pass the params of this config (e.g. from load_flux or init_params)")
    return {key: _join_to_torch(t, flat) for key, t in layout.items()}


def _diffusers_sources(bfl_key: str) -> tuple[list[str], bool]:
    """The diffusers keys whose concatenation is `bfl_key`, and whether halves swap."""
    module, leaf = bfl_key.rsplit(".", 1)
    leaf = "weight" if leaf == "scale" else leaf
    m = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", module)
    if m:
        table, prefix = ((_DIFFUSERS_DOUBLE, "transformer_blocks") if m[1] == "double_blocks"
                         else (_DIFFUSERS_SINGLE, "single_transformer_blocks"))
        names = [f"{prefix}.{m[2]}.{name}" for name in table[m[3]]]
    else:
        names = _DIFFUSERS_TOP[module]
    return [f"{name}.{leaf}" for name in names], module == _SWAPPED


def _diffusers_plan(config: FluxConfig) -> dict[str, tuple[list[tuple[str, tuple]], bool]]:
    """bfl key -> ([(diffusers key, torch shape)], swap halves)."""
    plan = {}
    for key, shape in bfl_shapes(config).items():
        names, swap = _diffusers_sources(key)
        # Fused q, k, v (and the single-block MLP input) are hidden-wide except the last part.
        rows = [config.hidden_size] * (len(names) - 1)
        rows.append(shape[0] - sum(rows))
        plan[key] = ([(n, (r,) + shape[1:]) for n, r in zip(names, rows)], swap)
    return plan


# ----------------------------------------------------------------------------- files


def _resolve(path: str | os.PathLike) -> tuple[str, str]:
    """("diffusers", transformer folder) or ("bfl", file)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Flux weights not found: {path}")
    if os.path.isfile(path):
        return "bfl", path
    for folder in (path, os.path.join(path, "transformer")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return "diffusers", folder
    raise FileNotFoundError(f"no config.json in {path} or {path}/transformer; pass a diffusers "
                            "transformer folder, its pipeline folder or a BFL .safetensors file")


def _diffusers_files(folder: str) -> list[str]:
    return weight_files(folder, _DIFFUSERS_WEIGHTS, _DIFFUSERS_INDEX)


def _diffusers_config(folder: str) -> FluxConfig:
    file = os.path.join(folder, "config.json")
    cfg = read_json(file)
    name = cfg.get("_class_name", "FluxTransformer2DModel")
    if name != "FluxTransformer2DModel":
        raise ValueError(f"{file}: _class_name is {name!r}, not FluxTransformer2DModel; "
                         "pass a FLUX.1 transformer")
    if cfg.get("patch_size", 1) != 1:
        raise ValueError(f"{file}: patch_size {cfg['patch_size']} is unsupported; FLUX.1 packs "
                         "2x2 patches outside the transformer (patch_size 1)")
    # Defaults are diffusers' FluxTransformer2DModel defaults.
    heads, head_dim = cfg.get("num_attention_heads", 24), cfg.get("attention_head_dim", 128)
    in_channels = cfg.get("in_channels", 64)
    try:
        return FluxConfig(
            in_channels=in_channels, out_channels=cfg.get("out_channels") or in_channels,
            vec_in_dim=cfg.get("pooled_projection_dim", 768),
            context_in_dim=cfg.get("joint_attention_dim", 4096),
            hidden_size=heads * head_dim, num_heads=heads,
            depth=cfg.get("num_layers", 19), depth_single_blocks=cfg.get("num_single_layers", 38),
            axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
            guidance_embed=bool(cfg.get("guidance_embeds", False)))
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from err


def _bfl_config(file: str, shapes: Shapes, axes_dim: tuple[int, ...] | None) -> FluxConfig:
    """Infers a FluxConfig from the tensor shapes of a BFL checkpoint."""
    def blocks(prefix: str) -> int:
        found = [int(m[1]) for k in shapes if (m := re.match(rf"{prefix}\.(\d+)\.", k))]
        return max(found) + 1 if found else 0

    depth, depth_single = blocks("double_blocks"), blocks("single_blocks")
    norm_key = ("double_blocks.0.img_attn.norm.query_norm.scale" if depth
                else "single_blocks.0.norm.query_norm.scale")
    mlp_key = "double_blocks.0.img_mlp.0.weight" if depth else "single_blocks.0.linear1.weight"
    needed = ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight",
              "final_layer.linear.weight", norm_key, mlp_key]
    missing = [k for k in needed if k not in shapes]
    if missing:
        hint = (" (these look like diffusers names: pass the folder with config.json)"
                if "x_embedder.weight" in shapes else "")
        raise ValueError(f"{file}: cannot infer the Flux config, missing {', '.join(missing)}"
                         f"{hint}; {_HINT}")
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes[norm_key][0]
    mlp_rows = shapes[mlp_key][0] - (0 if depth else 3 * hidden)
    if axes_dim is None:
        if head_dim != 128:
            raise ValueError(f"{file}: cannot infer axes_dim for head dim {head_dim}; pass "
                             f"axes_dim=(...) summing to {head_dim} to load_flux")
        axes_dim = (16, 56, 56)
    qkv_bias_key = ("double_blocks.0.img_attn.qkv.bias" if depth
                    else "single_blocks.0.linear1.bias")
    try:
        return FluxConfig(
            in_channels=in_channels, out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            context_in_dim=shapes["txt_in.weight"][1], hidden_size=hidden,
            mlp_ratio=mlp_rows / hidden, num_heads=hidden // head_dim, depth=depth,
            depth_single_blocks=depth_single, axes_dim=tuple(axes_dim),
            qkv_bias=qkv_bias_key in shapes, guidance_embed="guidance_in.in_layer.weight" in shapes)
    except ValueError as err:
        raise ValueError(f"{file}: inferred an invalid config ({err})") from err


def _check(source: str, found: Shapes, expected: Shapes, config: FluxConfig) -> None:
    check_shapes(source, found, expected,
                 f"Flux(hidden {config.hidden_size}, depth {config.depth}+"
                 f"{config.depth_single_blocks}, guidance {config.guidance_embed})", _HINT)


# ----------------------------------------------------------------------------- public


def read_flux_config(path: str | os.PathLike, *,
                     axes_dim: tuple[int, ...] | None = None) -> FluxConfig:
    """The FluxConfig of a checkpoint, reading only config.json or the safetensors header.

    Same paths and `axes_dim` rule as `load_flux`.
    """
    kind, where = _resolve(path)
    if kind == "diffusers":
        return _diffusers_config(where)
    with contextlib.ExitStack() as stack:
        return _bfl_config(where, Tensors([where], stack).shapes, axes_dim)


def load_flux(path: str | os.PathLike, *, dtype: Any = np.float32,
              axes_dim: tuple[int, ...] | None = None, scan_blocks: bool = False
              ) -> tuple[FluxConfig, Params]:
    """Loads a FLUX.1 transformer checkpoint as `(config, params)`.

    `params` is the plain (unboxed) tree for `Flux(config).apply({"params": params}, ...)`.

    Args:
      path: a diffusers transformer folder (or the pipeline folder containing
        `transformer/`), or a BFL single-file `.safetensors` checkpoint.
      dtype: numpy dtype of the returned arrays (np.float32, or ml_dtypes.bfloat16 to halve
        host memory).
      axes_dim: rotary dims per id axis, for BFL files whose head dim is not 128 (FLUX.1
        uses (16, 56, 56)); diffusers folders read it from config.json.
      scan_blocks: return the stacked `scan_blocks` layout (and a config saying so).

    Raises:
      FileNotFoundError: the path, its config.json or its weight files do not exist.
      ValueError: unreadable files, an invalid config, or tensors that are missing,
        unexpected or mis-shaped (all listed in one message).
    """
    dtype = float_dtype(dtype)
    with contextlib.ExitStack() as stack:
        config, readers = flux_readers(path, stack, axes_dim=axes_dim)
        params = materialize(readers, dtype)
    if scan_blocks:
        return dataclasses.replace(config, scan_blocks=True), stack_blocks(params, config)
    return config, params


def flux_readers(path: str | os.PathLike, stack: contextlib.ExitStack, *,
                 axes_dim: tuple[int, ...] | None = None) -> tuple[FluxConfig, Readers]:
    """The config of a FLUX.1 transformer checkpoint and a reader per Flax leaf.

    Every tensor is checked before any is read; the files stay open until `stack` closes.
    Readers return Flax layout in the stored dtype. The Flax leaves cut from one BFL
    tensor (a single block's `linear1/qkv` and `linear1/mlp`) share it: it is assembled
    once (from diffusers' split q, k, v ... when needed) and dropped after its last part
    is read, so reading leaf by leaf holds at most one checkpoint tensor. Same paths,
    `axes_dim` rule and errors as `load_flux`.
    """
    kind, where = _resolve(path)
    if kind == "diffusers":
        config = _diffusers_config(where)
        tensors = Tensors(_diffusers_files(where), stack)
        plan = _diffusers_plan(config)
        _check(where, tensors.shapes, {k: s for sources, _ in plan.values() for k, s in sources},
               config)

        def assemble(key: str) -> np.ndarray:
            sources, swap = plan[key]
            parts = [tensors.read(k) for k, _ in sources]
            array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            return np.roll(array, array.shape[0] // 2, axis=0) if swap else array
    else:
        tensors = Tensors([where], stack)
        config = _bfl_config(where, tensors.shapes, axes_dim)
        _check(where, tensors.shapes, bfl_shapes(config), config)
        assemble = tensors.read
    return config, _part_readers(_bfl_layout(config), assemble)


def _part_readers(layout: dict[str, _Tensor], assemble: Callable[[str], np.ndarray]) -> Readers:
    """A reader per Flax leaf of every BFL tensor, sharing a one-tensor cache."""
    current: dict[str, Any] = {}  # key, the assembled tensor, the parts not yet read

    def reader(key: str, tensor: _Tensor, i: int) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            if current.get("key") != key:
                current.clear()
                current.update(key=key, array=assemble(key), left=set(range(len(tensor.parts))))
            array = current["array"]
            current["left"].discard(i)
            if not current["left"]:
                current.clear()
            sizes = np.cumsum([_torch_shape(p)[tensor.axis] for p in tensor.parts])
            start = sizes[i - 1] if i else 0
            piece = np.take(array, np.arange(start, sizes[i]), axis=tensor.axis) \
                if len(tensor.parts) > 1 else array
            part = tensor.parts[i]
            return (piece.T if part.in_dims else piece).reshape(part.shape)
        return read

    return {part.path: reader(key, tensor, i)
            for key, tensor in layout.items() for i, part in enumerate(tensor.parts)}


def save_flux_bfl(path: str | os.PathLike, config: FluxConfig, params: Params, *,
                  dtype: Any = None) -> None:
    """Writes Flax params as a BFL-layout single `.safetensors` file (flux1-dev layout).

    `dtype` casts every tensor (e.g. ml_dtypes.bfloat16); None keeps the params' dtypes.
    LoRA-adapted params are exported by merging first (`models.lora.merge`).

    Raises:
      ValueError: `params` does not fit `config` (every missing, unexpected or mis-shaped
        leaf listed).
    """
    tensors = _torch_tensors(config, params, "save_flux_bfl params")
    if dtype is not None:
        tensors = {k: v.astype(float_dtype(dtype)) for k, v in tensors.items()}
    save_file(tensors, os.fspath(path), metadata={"format": "pt"})


def diffusers_config(config: FluxConfig) -> dict[str, Any]:
    """The diffusers `FluxTransformer2DModel` config.json of `config`.

    Raises:
      ValueError: `config` has no diffusers equivalent (mlp_ratio other than 4).
    """
    if config.mlp_ratio != 4.0:
        raise ValueError(f"FluxConfig mlp_ratio {config.mlp_ratio}: diffusers' "
                         "FluxTransformer2DModel fixes mlp_ratio 4; export with save_flux_bfl")
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1,
            "in_channels": config.in_channels, "out_channels": config.out_channels,
            "num_layers": config.depth, "num_single_layers": config.depth_single_blocks,
            "attention_head_dim": config.head_dim, "num_attention_heads": config.num_heads,
            "joint_attention_dim": config.context_in_dim,
            "pooled_projection_dim": config.vec_in_dim,
            "guidance_embeds": config.guidance_embed, "axes_dims_rope": list(config.axes_dim)}


def save_flux_diffusers(folder: str | os.PathLike, config: FluxConfig, params: Params, *,
                        dtype: Any = None) -> None:
    """Writes Flax params as a diffusers `transformer/` folder: `config.json` and one
    `diffusion_pytorch_model.safetensors`, readable by `FluxTransformer2DModel.from_pretrained`
    and `load_flux`. The inverse of the loader's diffusers mapping.

    diffusers' q, k, v projections always have biases: a `qkv_bias=False` model is written
    with zero biases (the same function). `dtype` casts every tensor; None keeps the params'.
    LoRA-adapted params are exported by merging first (`models.lora.merge`).

    Raises:
      ValueError: `params` does not fit `config`, or `config` has no diffusers equivalent.
    """
    folder = os.fspath(folder)
    cfg = diffusers_config(config)
    bfl = _torch_tensors(config, params, "save_flux_diffusers params")
    if not config.qkv_bias:
        bfl = dict(bfl)
        for key, shape in bfl_shapes(dataclasses.replace(config, qkv_bias=True)).items():
            if key not in bfl:
                bfl[key] = np.zeros(shape, bfl[key[:-len("bias")] + "weight"].dtype)
        config = dataclasses.replace(config, qkv_bias=True)
    tensors = {}
    for key, (sources, swap) in _diffusers_plan(config).items():
        array = bfl[key]
        if swap:
            array = np.roll(array, -(array.shape[0] // 2), axis=0)
        rows = np.cumsum([shape[0] for _, shape in sources])[:-1]
        for (name, _), piece in zip(sources, np.split(array, rows, axis=0)):
            piece = np.ascontiguousarray(piece)
            tensors[name] = piece if dtype is None else piece.astype(float_dtype(dtype))
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, _DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
