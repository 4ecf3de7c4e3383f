"""FLUX.1 VAE checkpoints -> Flax params for `leapalign_jax.models.autoencoder.AutoencoderKL`.

Two layouts are read, tensor by tensor, through `leapalign_jax.weights.files`:

- a diffusers `vae/` folder (`config.json` + `diffusion_pytorch_model.safetensors`, or
  sharded), or the pipeline folder holding it;
- Black Forest Labs' single `ae.safetensors` (the original LDM names), whose widths and
  depths are inferred from tensor shapes; it carries no config, so the rest is FLUX.1's.

The Flax tree mirrors the diffusers names (see the model's docstring). Torch convs
(out, in, kh, kw) become Flax kernels (kh, kw, in, out); the mid-block attention's q, k, v
and output projections are linears (out, in) in diffusers and 1x1 convs (out, in, 1, 1) in
BFL files: both are accepted. BFL names differ from diffusers' as diffusers'
`convert_ldm_vae_checkpoint` undoes: `down.{i}.block.{j}` for `down_blocks.{i}.resnets.{j}`,
`mid.block_1` / `attn_1` / `block_2` for the mid block, `nin_shortcut` for `conv_shortcut`,
`norm_out` for `conv_norm_out`, and the decoder's `up.{i}` counts levels from the finest, so
it is diffusers' `up_blocks.{n - 1 - i}`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Any, Callable

import flax
import flax.linen as nn
import numpy as np

from leapalign_jax.models.autoencoder import FLUX_VAE, AutoencoderConfig, abstract_params
from leapalign_jax.weights.files import (Readers, Shapes, Tensors, check_shapes, float_dtype,
                                         materialize, read_json, weight_files)

Params = dict[str, Any]

_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_HINT = ("wrong model family (not a FLUX.1 / LDM AutoencoderKL?) or a truncated / partially "
         "converted file; check the checkpoint")
_ATTENTION = ("to_q", "to_k", "to_v", "to_out")
_BFL_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out": "proj_out"}


# ----------------------------------------------------------------------------- naming


def _leaf_name(leaf: str) -> str:
    return "weight" if leaf in ("kernel", "scale") else leaf


def _index(name: str) -> tuple[str, int | None]:
    """"resnets_2" -> ("resnets", 2); "conv1" -> ("conv1", None)."""
    m = re.fullmatch(r"(.+)_(\d+)", name)
    return (m[1], int(m[2])) if m else (name, None)


def flax_to_diffusers(path: tuple[str, ...]) -> str:
    """("decoder", "up_blocks_1", "upsample", "conv", "kernel") ->
    "decoder.up_blocks.1.upsamplers.0.conv.weight"."""
    *modules, leaf = path
    out = []
    for module in modules:
        base, i = _index(module)
        if module in ("downsample", "upsample", "attention"):
            out.append({"downsample": "downsamplers", "upsample": "upsamplers",
                        "attention": "attentions"}[module] + ".0")
        elif module == "to_out":
            out.append("to_out.0")
        elif i is not None and base in ("down_blocks", "up_blocks", "resnets"):
            out.append(f"{base}.{i}")
        else:
            out.append(module)
    return ".".join(out + [_leaf_name(leaf)])


def flax_to_bfl(path: tuple[str, ...], num_levels: int) -> str:
    """("decoder", "up_blocks_0", "resnets_2", "conv_shortcut", "kernel") ->
    "decoder.up.{num_levels - 1}.block.2.nin_shortcut.weight"."""
    *modules, leaf = path
    out = []
    for k, module in enumerate(modules):
        base, i = _index(module)
        parent = modules[k - 1] if k else ""
        if base == "down_blocks":
            out.append(f"down.{i}")
        elif base == "up_blocks":
            out.append(f"up.{num_levels - 1 - i}")
        elif base == "resnets" and parent == "mid_block":
            out.append(f"block_{i + 1}")
        elif base == "resnets":
            out.append(f"block.{i}")
        elif module == "mid_block":
            out.append("mid")
        elif module == "attention":
            out.append("attn_1")
        elif parent == "attention":
            out.append(_BFL_ATTENTION[module])
        elif module == "conv_shortcut":
            out.append("nin_shortcut")
        elif module == "conv_norm_out":
            out.append("norm_out")
        else:
            out.append(module)
    return ".".join(out + [_leaf_name(leaf)])


def flax_shapes(config: AutoencoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every Flax leaf of `AutoencoderKL(config)`: path -> shape."""
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract_params(config)))
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Flax kernel shape -> torch weight shape (conv (kh, kw, i, o) -> (o, i, kh, kw))."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1]


def _to_flax(array: np.ndarray) -> np.ndarray:
    """Torch layout -> Flax layout (a view; `materialize` copies and casts)."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array.T


def _is_attention(path: tuple[str, ...]) -> bool:
    return len(path) >= 2 and path[-2] in _ATTENTION and path[-1] == "kernel"


# ----------------------------------------------------------------------------- files


def _resolve(path: str | os.PathLike) -> tuple[str, str]:
    """("diffusers", vae folder) or ("bfl", file)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"VAE weights not found: {path}")
    if os.path.isfile(path):
        return "bfl", path
    for folder in (path, os.path.join(path, "vae")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return "diffusers", folder
    raise FileNotFoundError(f"no config.json in {path} or {path}/vae; pass a diffusers vae "
                            "folder, its pipeline folder or BFL's ae.safetensors")


def _diffusers_config(folder: str) -> AutoencoderConfig:
    file = os.path.join(folder, "config.json")
    cfg = read_json(file)
    name = cfg.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise ValueError(f"{file}: _class_name is {name!r}, not AutoencoderKL; pass the "
                         "FLUX.1 vae folder (AutoencoderKL)")
    # Defaults are diffusers' AutoencoderKL defaults, not FLUX.1's.
    widths = tuple(cfg.get("block_out_channels", (64,)))
    blocks = [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")]
    for field, block in blocks:
        types = cfg.get(field, [block] * len(widths))
        if list(types) != [block] * len(widths):
            raise ValueError(f"{file}: {field} {types} unsupported; expected "
                             f"{len(widths)} x {block!r} (one per block_out_channels)")
    if cfg.get("act_fn", "silu") != "silu":
        raise ValueError(f"{file}: act_fn {cfg['act_fn']!r} unsupported; only 'silu'")
    shift = cfg.get("shift_factor")
    try:
        return AutoencoderConfig(
            in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
            latent_channels=cfg.get("latent_channels", 4), block_out_channels=widths,
            layers_per_block=cfg.get("layers_per_block", 1),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            use_quant_conv=bool(cfg.get("use_quant_conv", True)),
            use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)),
            scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
            shift_factor=0.0 if shift is None else float(shift))
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from err


def _bfl_config(file: str, shapes: Shapes, norm_num_groups: int | None) -> AutoencoderConfig:
    """FLUX.1's VAE config with widths, depths and flags inferred from a BFL file's shapes."""
    needed = ["encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight",
              "encoder.down.0.block.0.conv1.weight"]
    missing = [k for k in needed if k not in shapes]
    if missing:
        hint = ""
        if "encoder.down_blocks.0.resnets.0.conv1.weight" in shapes:
            hint = " (these are diffusers names: pass the vae folder with config.json)"
        elif any(k.startswith(("double_blocks.", "single_blocks.")) for k in shapes):
            hint = " (this is a FLUX transformer, not the VAE: pass ae.safetensors)"
        raise ValueError(f"{file}: cannot infer the VAE config, missing {', '.join(missing)}"
                         f"{hint}; {_HINT}")

    def count(pattern: str) -> int:
        found = [int(m[1]) for k in shapes if (m := re.match(pattern, k))]
        return max(found) + 1 if found else 0

    levels = count(r"encoder\.down\.(\d+)\.")
    widths = []
    for i in range(levels):
        key = f"encoder.down.{i}.block.0.conv1.weight"
        if key not in shapes:
            raise ValueError(f"{file}: missing {key}; {_HINT}")
        widths.append(shapes[key][0])
    groups = FLUX_VAE.norm_num_groups if norm_num_groups is None else norm_num_groups
    try:
        return dataclasses.replace(
            FLUX_VAE, in_channels=shapes["encoder.conv_in.weight"][1],
            out_channels=shapes["decoder.conv_out.weight"][0],
            latent_channels=shapes["encoder.conv_out.weight"][0] // 2,
            block_out_channels=tuple(widths),
            layers_per_block=count(r"encoder\.down\.0\.block\.(\d+)\."),
            norm_num_groups=groups,
            use_quant_conv="quant_conv.weight" in shapes,
            use_post_quant_conv="post_quant_conv.weight" in shapes,
            mid_block_add_attention="encoder.mid.attn_1.q.weight" in shapes)
    except ValueError as err:
        fix = "" if norm_num_groups is not None else "; pass norm_num_groups=... to the loader"
        raise ValueError(f"{file}: inferred an invalid config ({err}){fix}") from err


def _layout(config: AutoencoderConfig, kind: str) -> dict[tuple[str, ...],
                                                           tuple[str, tuple[int, ...]]]:
    """Flax path -> (checkpoint key, torch shape) for `kind` "diffusers" or "bfl"."""
    levels = len(config.block_out_channels)
    plan = {}
    for path, shape in flax_shapes(config).items():
        key = flax_to_diffusers(path) if kind == "diffusers" else flax_to_bfl(path, levels)
        plan[path] = (key, _torch_shape(shape))
    return plan


def _found_shapes(tensors: Tensors, attention_keys: set[str]) -> Shapes:
    """The stored shapes, with 1x1-conv attention weights (C, C, 1, 1) seen as (C, C)."""
    found = dict(tensors.shapes)
    for key in attention_keys:
        shape = found.get(key)
        if shape is not None and len(shape) == 4 and shape[2:] == (1, 1):
            found[key] = shape[:2]
    return found


# ----------------------------------------------------------------------------- public


def read_autoencoder_config(path: str | os.PathLike, *,
                            norm_num_groups: int | None = None) -> AutoencoderConfig:
    """The AutoencoderConfig of a checkpoint, reading only config.json or the safetensors
    header.

    Args:
      path: a diffusers vae folder (or the pipeline folder holding `vae/`), or BFL's
        `ae.safetensors`.
      norm_num_groups: GroupNorm groups of a BFL file (shapes do not tell; FLUX.1 uses 32);
        ignored for diffusers folders, whose config.json says.
    """
    kind, where = _resolve(path)
    if kind == "diffusers":
        return _diffusers_config(where)
    with contextlib.ExitStack() as stack:
        return _bfl_config(where, Tensors([where], stack).shapes, norm_num_groups)


def autoencoder_readers(path: str | os.PathLike, stack: contextlib.ExitStack,
                        config: AutoencoderConfig | None = None) -> Readers:
    """Flax path -> reader of that leaf (Flax layout, stored dtype) for a VAE checkpoint.

    The files stay open until `stack` closes. Every tensor is checked against `config`
    (default: `read_autoencoder_config(path)`) before any is read.

    Raises:
      FileNotFoundError: the path, its config.json or its weight files do not exist.
      ValueError: unreadable files, a config of another class, or tensors that are missing,
        unexpected or mis-shaped (all listed in one message).
    """
    kind, where = _resolve(path)
    config = config or read_autoencoder_config(path)
    files = ([where] if kind == "bfl"
             else weight_files(where, _DIFFUSERS_WEIGHTS, _DIFFUSERS_INDEX))
    tensors = Tensors(files, stack)
    plan = _layout(config, kind)
    attention = {key for p, (key, _) in plan.items() if _is_attention(p)}
    check_shapes(where, _found_shapes(tensors, attention), dict(plan.values()),
                 f"AutoencoderKL(widths {list(config.block_out_channels)}, "
                 f"{config.layers_per_block} layers, latent {config.latent_channels}, "
                 f"quant_conv {config.use_quant_conv}, post_quant_conv "
                 f"{config.use_post_quant_conv})", _HINT)

    def reader(key: str, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
        return lambda: _to_flax(tensors.read(key).reshape(shape))

    return {p: reader(key, shape) for p, (key, shape) in plan.items()}


def load_autoencoder(path: str | os.PathLike, *, dtype: Any = np.float32,
                     norm_num_groups: int | None = None) -> tuple[AutoencoderConfig, Params]:
    """Loads a FLUX.1 VAE checkpoint as `(config, params)`.

    `params` is the plain (unboxed) tree for `AutoencoderKL(config).apply({"params":
    params}, ..., method="encode" / "decode")`.

    Args:
      path: a diffusers vae folder (or the pipeline folder holding `vae/`), or BFL's
        single-file `ae.safetensors`.
      dtype: numpy dtype of the returned arrays (np.float32, or ml_dtypes.bfloat16).
      norm_num_groups: GroupNorm groups of a BFL file (default FLUX.1's 32).

    Raises:
      FileNotFoundError: the path, its config.json or its weight files do not exist.
      ValueError: unreadable files, a config of another class, or tensors that are missing,
        unexpected or mis-shaped (all listed in one message).
    """
    dtype = float_dtype(dtype)
    config = read_autoencoder_config(path, norm_num_groups=norm_num_groups)
    with contextlib.ExitStack() as stack:
        params = materialize(autoencoder_readers(path, stack, config), dtype)
    return config, params
