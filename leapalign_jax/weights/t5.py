"""transformers T5 checkpoints -> Flax params for `leapalign_jax.models.t5.T5Encoder`.

Reads a transformers folder (`config.json` + `model.safetensors`, or sharded
`model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`), such as FLUX.1's
`text_encoder_2/` (bf16, two shards), or the pipeline folder that holds it.

Key rules:

- The embedding is `shared.weight` or `encoder.embed_tokens.weight` (tied: transformers
  saves one or both). Either is accepted; when both are present `shared.weight` is used,
  as transformers' tying does.
- A full `T5Model` / `T5ForConditionalGeneration` checkpoint also holds `decoder.*` and
  `lm_head.*` tensors: these are skipped, as `T5EncoderModel` does. Any other tensor the
  encoder does not use is an error, as are missing or mis-shaped ones (one message lists
  them all).

Torch Linear weights (out, in) become Flax kernels (in, out); the first block's
`relative_attention_bias` becomes the top-level `relative_attention_bias/embedding`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np

from leapalign_jax.models.t5 import T5Config
from leapalign_jax.weights.files import (Readers, Shapes, Tensors, check_shapes, materialize,
                                         read_json, weight_files)

Params = dict[str, Any]

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_SUBFOLDER = "text_encoder_2"  # where a FLUX.1 pipeline folder keeps its T5
_EMBED = "shared.weight"
_EMBED_ALIAS = "encoder.embed_tokens.weight"
_SKIPPED_PREFIXES = ("decoder.", "lm_head.")  # the decoder half of a full T5 checkpoint
_HINT = ("pass a transformers T5 encoder folder (FLUX.1's text_encoder_2/) whose config.json "
         "matches its weights; a truncated or partial download also gives this")


# ----------------------------------------------------------------------------- naming


def torch_keys(config: T5Config) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Flax leaf path -> (torch key, whether the tensor is a Linear weight to transpose)."""
    keys: dict[tuple[str, ...], tuple[str, bool]] = {
        ("shared", "embedding"): (_EMBED, False),
        ("relative_attention_bias", "embedding"):
            ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False),
        ("final_layer_norm", "weight"): ("encoder.final_layer_norm.weight", False),
    }
    ff = ["wi_0", "wi_1", "wo"] if config.is_gated_act else ["wi", "wo"]
    for i in range(config.num_layers):
        block, prefix = f"block_{i}", f"encoder.block.{i}.layer"
        for name in ("q", "k", "v", "o"):
            keys[(block, "attention", name, "kernel")] = (
                f"{prefix}.0.SelfAttention.{name}.weight", True)
        keys[(block, "attention_norm", "weight")] = (f"{prefix}.0.layer_norm.weight", False)
        for name in ff:
            keys[(block, "mlp", name, "kernel")] = (
                f"{prefix}.1.DenseReluDense.{name}.weight", True)
        keys[(block, "mlp_norm", "weight")] = (f"{prefix}.1.layer_norm.weight", False)
    return keys


def t5_shapes(config: T5Config) -> Shapes:
    """Every tensor of a `T5EncoderModel` checkpoint for `config`: key -> torch shape.

    The embedding is listed once, as `shared.weight`.
    """
    c = config
    shapes = {_EMBED: (c.vocab_size, c.d_model),
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                  (c.relative_attention_num_buckets, c.num_heads),
              "encoder.final_layer_norm.weight": (c.d_model,)}
    for i in range(c.num_layers):
        prefix = f"encoder.block.{i}.layer"
        for name in ("q", "k", "v"):
            shapes[f"{prefix}.0.SelfAttention.{name}.weight"] = (c.inner_dim, c.d_model)
        shapes[f"{prefix}.0.SelfAttention.o.weight"] = (c.d_model, c.inner_dim)
        shapes[f"{prefix}.0.layer_norm.weight"] = (c.d_model,)
        for name in (("wi_0", "wi_1") if c.is_gated_act else ("wi",)):
            shapes[f"{prefix}.1.DenseReluDense.{name}.weight"] = (c.d_ff, c.d_model)
        shapes[f"{prefix}.1.DenseReluDense.wo.weight"] = (c.d_model, c.d_ff)
        shapes[f"{prefix}.1.layer_norm.weight"] = (c.d_model,)
    return shapes


# ----------------------------------------------------------------------------- files


def _resolve(folder: str | os.PathLike) -> str:
    """The folder holding the T5 config.json: `folder` itself or its `text_encoder_2/`."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"T5 encoder folder not found: {folder}")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    sub = os.path.join(folder, _SUBFOLDER)
    if os.path.isfile(os.path.join(sub, "config.json")):
        return sub
    raise FileNotFoundError(f"no config.json in {folder} or {sub}; pass a transformers T5 "
                            "encoder folder (FLUX.1's text_encoder_2/) or its pipeline folder")


def _parse_feed_forward(proj: Any, file: str) -> tuple[str, bool]:
    """transformers' rule: "gated-gelu" -> (gelu_new, gated); "relu" -> (relu, plain)."""
    parts = str(proj).split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"{file}: feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'; "
                         "fix config.json (T5 v1.1 uses 'gated-gelu')")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    return act, parts[0] == "gated"


def read_t5_config(folder: str | os.PathLike) -> T5Config:
    """The T5Config of a transformers T5 folder (or FLUX.1 pipeline folder), from config.json.

    Raises:
      FileNotFoundError: no folder or no config.json.
      ValueError: another model family (e.g. FLUX's CLIP `text_encoder/`) or invalid values.
    """
    file = os.path.join(_resolve(folder), "config.json")
    cfg = read_json(file)
    model_type = cfg.get("model_type")
    if model_type != "t5":
        clip = "clip" in str(model_type)
        raise ValueError(
            f"{file}: model_type is {model_type!r}, not 't5'"
            + (" (a CLIP text encoder: FLUX.1's text_encoder/)" if clip else "")
            + "; pass the T5 encoder folder (FLUX.1's text_encoder_2/)")
    architectures = cfg.get("architectures") or []
    if any(not str(a).startswith("T5") for a in architectures):
        raise ValueError(f"{file}: architectures {architectures} are not T5 models; pass a "
                         "T5EncoderModel folder (FLUX.1's text_encoder_2/)")
    act, gated = _parse_feed_forward(cfg.get("feed_forward_proj", "relu"), file)
    # Defaults are transformers' T5Config defaults.
    try:
        return T5Config(
            vocab_size=cfg.get("vocab_size", 32128), d_model=cfg.get("d_model", 512),
            d_kv=cfg.get("d_kv", 64), d_ff=cfg.get("d_ff", 2048),
            num_layers=cfg.get("num_layers", 6), num_heads=cfg.get("num_heads", 8),
            relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-6),
            dense_act_fn=act, is_gated_act=gated)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{file}: {err}") from err


def t5_readers(tensors: Tensors, config: T5Config, *, source: str = "T5 checkpoint") -> Readers:
    """Checks `tensors` against `config` and maps each Flax leaf path to its reader.

    Readers return Flax layout in the stored dtype. `source` names the checkpoint in errors.

    Raises:
      ValueError: missing, mis-shaped or unexpected encoder tensors, all listed.
    """
    found = {k: s for k, s in tensors.shapes.items() if not k.startswith(_SKIPPED_PREFIXES)}
    expected = t5_shapes(config)
    embed = _EMBED
    if _EMBED_ALIAS in found:
        # The tied copy: check it too, read it only when `shared.weight` is absent.
        expected[_EMBED_ALIAS] = expected[_EMBED]
        if _EMBED not in found:
            embed = _EMBED_ALIAS
            del expected[_EMBED]
    check_shapes(source, found, expected,
                 f"T5Encoder(d_model {config.d_model}, {config.num_layers} layers, "
                 f"{config.num_heads} heads of {config.d_kv}, d_ff {config.d_ff}, "
                 f"gated {config.is_gated_act})", _HINT)

    readers: Readers = {}
    for path, (key, transpose) in torch_keys(config).items():
        key = embed if key == _EMBED else key
        readers[path] = ((lambda key=key: tensors.read(key).T) if transpose
                         else (lambda key=key: tensors.read(key)))
    return readers


def load_t5(folder: str | os.PathLike, dtype: Any = np.float32) -> tuple[T5Config, Params]:
    """Loads a T5 encoder checkpoint as `(config, params)`, one tensor at a time.

    `params` is the plain tree for `T5Encoder(config).apply({"params": params}, ids)`.

    Args:
      folder: a transformers T5 folder (FLUX.1's `text_encoder_2/`) or the pipeline
        folder containing `text_encoder_2/`.
      dtype: numpy dtype of the returned arrays (np.float32, or ml_dtypes.bfloat16 to halve
        host memory).

    Raises:
      FileNotFoundError: the folder, its config.json or its weight files do not exist.
      ValueError: another model family, unreadable files, or tensors that are missing,
        unexpected or mis-shaped (all listed in one message).
    """
    where = _resolve(folder)
    config = read_t5_config(where)
    with contextlib.ExitStack() as stack:
        tensors = Tensors(weight_files(where, _WEIGHTS, _INDEX), stack)
        return config, materialize(t5_readers(tensors, config, source=where), dtype)
