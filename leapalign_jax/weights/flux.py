"""Flux transformer checkpoints -> Flax params for `leapalign_jax.models.flux.Flux`.

Two layouts are read, tensor by tensor, with `safetensors.safe_open(framework="numpy")`:

- a diffusers `transformer/` folder (`config.json` + one or sharded
  `diffusion_pytorch_model*.safetensors`), or the pipeline folder holding it;
- a Black Forest Labs single file (`flux1-dev.safetensors`), whose config is inferred from
  tensor shapes.

The Flax tree mirrors the BFL names (`double_blocks.3.img_attn.qkv.weight` is
`double_blocks_3/img_attn/qkv/kernel`, transposed from torch's (out, in)). diffusers splits
q, k and v (and the single-block MLP input) into separate linears and orders the final
adaLN chunks (scale, shift) where BFL has (shift, scale); both are undone here.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from leapalign_jax.models.flux import Flux, FluxConfig
from leapalign_jax.weights.files import (Shapes, Tensors, cast, check_shapes, float_dtype,
                                         read_json, set_path, weight_files)

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


def _flax_to_bfl(path: tuple[str, ...]) -> str:
    """("double_blocks_3", "img_mlp_0", "kernel") -> "double_blocks.3.img_mlp.0.weight"."""
    *modules, leaf = path
    modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join(modules + ["weight" if leaf == "kernel" else leaf])


def _bfl_to_flax(key: str) -> tuple[str, ...]:
    parts = key.split(".")
    path: list[str] = []
    for part in parts[:-1]:
        if part.isdigit():
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path) + ("kernel" if parts[-1] == "weight" else parts[-1],)


def bfl_shapes(config: FluxConfig) -> Shapes:
    """Every tensor of a BFL checkpoint for `config`: key -> torch-layout shape."""
    c = config
    example = (jnp.zeros((1, 1, c.in_channels)), jnp.zeros((1, 1, 3)),
               jnp.zeros((1, 1, c.context_in_dim)), jnp.zeros((1, 1, 3)), jnp.zeros((1,)),
               jnp.zeros((1, c.vec_in_dim)), jnp.zeros((1,)) if c.guidance_embed else None)
    abstract = jax.eval_shape(Flux(c).init, jax.random.key(0), *example)["params"]
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract))
    return {_flax_to_bfl(path): tuple(leaf.shape[::-1]) for path, leaf in flat.items()}


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


def _to_flax(key: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Torch layout -> Flax layout (Linear (out, in) -> kernel (in, out)) in `dtype`."""
    return cast(array, dtype, transpose=key.endswith(".weight"))


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
              axes_dim: tuple[int, ...] | None = None) -> tuple[FluxConfig, Params]:
    """Loads a FLUX.1 transformer checkpoint as `(config, params)`.

    `params` is the plain (unboxed) tree for `Flux(config).apply({"params": params}, ...)`.

    Args:
      path: a diffusers transformer folder (or the pipeline folder containing
        `transformer/`), or a BFL single-file `.safetensors` checkpoint.
      dtype: numpy dtype of the returned arrays (np.float32, or ml_dtypes.bfloat16 to halve
        host memory).
      axes_dim: rotary dims per id axis, for BFL files whose head dim is not 128 (FLUX.1
        uses (16, 56, 56)); diffusers folders read it from config.json.

    Raises:
      FileNotFoundError: the path, its config.json or its weight files do not exist.
      ValueError: unreadable files, an invalid config, or tensors that are missing,
        unexpected or mis-shaped (all listed in one message).
    """
    dtype = float_dtype(dtype)
    kind, where = _resolve(path)
    params: Params = {}
    with contextlib.ExitStack() as stack:
        if kind == "diffusers":
            config = _diffusers_config(where)
            tensors = Tensors(_diffusers_files(where), stack)
            plan = _diffusers_plan(config)
            expected = {k: s for sources, _ in plan.values() for k, s in sources}
            _check(where, tensors.shapes, expected, config)
            for key, (sources, swap) in plan.items():
                parts = [tensors.read(k) for k, _ in sources]
                array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
                if swap:
                    array = np.roll(array, array.shape[0] // 2, axis=0)
                set_path(params, _bfl_to_flax(key), _to_flax(key, array, dtype))
        else:
            tensors = Tensors([where], stack)
            config = _bfl_config(where, tensors.shapes, axes_dim)
            expected = bfl_shapes(config)
            _check(where, tensors.shapes, expected, config)
            for key in expected:
                set_path(params, _bfl_to_flax(key), _to_flax(key, tensors.read(key), dtype))
    return config, params


def save_flux_bfl(path: str | os.PathLike, config: FluxConfig, params: Params, *,
                  dtype: Any = None) -> None:
    """Writes Flax params as a BFL-layout single `.safetensors` file (flux1-dev layout).

    `dtype` casts every tensor (e.g. ml_dtypes.bfloat16); None keeps the params' dtypes.
    """
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(params))
    tensors = {}
    for flax_path, leaf in flat.items():
        array = np.asarray(leaf)
        key = _flax_to_bfl(flax_path)
        tensors[key] = np.ascontiguousarray(array.T if key.endswith(".weight") else array)
        if dtype is not None:
            tensors[key] = tensors[key].astype(float_dtype(dtype))
    _check("save_flux_bfl params", {k: v.shape for k, v in tensors.items()},
           bfl_shapes(config), config)
    save_file(tensors, os.fspath(path), metadata={"format": "pt"})
