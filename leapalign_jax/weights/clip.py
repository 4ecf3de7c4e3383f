"""Hugging Face CLIP checkpoints -> Flax params for `leapalign_jax.models.clip`.

Folders saved by transformers (`config.json` + `model.safetensors`, or sharded with
`model.safetensors.index.json`) are read tensor by tensor:

- a `CLIPTextModel` (FLUX's `text_encoder/`, model_type "clip_text_model") or
  `CLIPTextModelWithProjection`: `load_clip_text`;
- a `CLIPVisionModel` or `CLIPVisionModelWithProjection` ("clip_vision_model"):
  `load_clip_vision`;
- a full `CLIPModel` ("clip"): `load_clip`.

transformers 4 stores a tower under `text_model.` / `vision_model.`; transformers 5 saves a
plain `CLIPTextModel` / `CLIPVisionModel` without that prefix. Both are accepted, and the
`position_ids` buffers some versions store are ignored.

The checkpoint names live in one table per tower (`HF_TEXT_KEYS`, `HF_VISION_KEYS`): Flax
leaf path -> (stored key, layout). Another checkpoint layout of the same networks (OpenCLIP's
`.pt`, with fused `in_proj_weight` and `c_fc`/`c_proj`) is another table over the same Flax
paths, read by `table_readers` with its own layouts.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import numpy as np

from leapalign_jax.models.clip import (CLIPConfig, CLIPTextConfig, CLIPVisionConfig,
                                       abstract_params)
from leapalign_jax.weights.files import (Readers, Shapes, Tensors, check_shapes, float_dtype,
                                         materialize, read_json, weight_files)

Params = dict[str, Any]

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_HINT = ("wrong model family or a truncated / partially converted file; check that "
         "config.json belongs to these weights")


# ----------------------------------------------------------------------------- key tables


class Layout(NamedTuple):
    """How a stored tensor becomes a Flax leaf.

    to_flax: stored array -> Flax-layout array (may be a view).
    stored_shape: Flax leaf shape -> the shape the stored tensor must have.
    """

    to_flax: Callable[[np.ndarray], np.ndarray]
    stored_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


LAYOUTS: dict[str, Layout] = {
    "copy": Layout(lambda a: a, lambda s: s),
    # torch Linear (out, in) -> Dense kernel (in, out)
    "linear": Layout(lambda a: a.T, lambda s: s[::-1]),
    # torch Conv2d (out, in, kh, kw) -> Conv kernel (kh, kw, in, out)
    "conv": Layout(lambda a: a.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1])),
}

# Flax leaf path inside a tower ("/"-joined, "{i}" = layer index) -> (stored key, layout).
# "{p}" in a key is the tower's prefix ("text_model.", "vision_model." or "").
Table = dict[str, tuple[str, str]]


def _linear(flax_path: str, key: str) -> Table:
    return {f"{flax_path}/kernel": (f"{key}.weight", "linear"),
            f"{flax_path}/bias": (f"{key}.bias", "copy")}


def _norm(flax_path: str, key: str) -> Table:
    return {f"{flax_path}/scale": (f"{key}.weight", "copy"),
            f"{flax_path}/bias": (f"{key}.bias", "copy")}


def _layer_keys() -> Table:
    layer, key = "encoder/layers_{i}", "{p}encoder.layers.{i}"
    table: Table = {}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        table |= _linear(f"{layer}/self_attn/{proj}", f"{key}.self_attn.{proj}")
    for fc in ("fc1", "fc2"):
        table |= _linear(f"{layer}/mlp/{fc}", f"{key}.mlp.{fc}")
    for norm in ("layer_norm1", "layer_norm2"):
        table |= _norm(f"{layer}/{norm}", f"{key}.{norm}")
    return table


HF_TEXT_KEYS: Table = {
    "embeddings/token_embedding/embedding": ("{p}embeddings.token_embedding.weight", "copy"),
    "embeddings/position_embedding/embedding": ("{p}embeddings.position_embedding.weight",
                                                "copy"),
    **_layer_keys(),
    **_norm("final_layer_norm", "{p}final_layer_norm"),
    "text_projection/kernel": ("text_projection.weight", "linear"),  # outside the tower
}

HF_VISION_KEYS: Table = {
    "embeddings/class_embedding": ("{p}embeddings.class_embedding", "copy"),
    "embeddings/patch_embedding/kernel": ("{p}embeddings.patch_embedding.weight", "conv"),
    "embeddings/position_embedding/embedding": ("{p}embeddings.position_embedding.weight",
                                                "copy"),
    **_norm("pre_layrnorm", "{p}pre_layrnorm"),
    **_layer_keys(),
    **_norm("post_layernorm", "{p}post_layernorm"),
    "visual_projection/kernel": ("visual_projection.weight", "linear"),  # outside the tower
}

# Where each tower sits in a full CLIPModel, in Flax and in the HF checkpoint.
_CLIP_TEXT_PREFIX, _CLIP_VISION_PREFIX = "text_model.", "vision_model."


class Plan(NamedTuple):
    """One Flax leaf: the stored key it comes from, the layout, and the Flax shape."""

    key: str
    layout: str
    shape: tuple[int, ...]


def plan_from_table(abstract: Any, table: Table, prefix: str) -> dict[tuple[str, ...], Plan]:
    """Flax leaf path -> Plan for every leaf of `abstract` (a tower's abstract params).

    Layer indices in the path (`layers_3`) fill "{i}" in the table; `prefix` fills "{p}".
    """
    plan = {}
    for path, leaf in flax.traverse_util.flatten_dict(nn.meta.unbox(abstract)).items():
        joined, index = "/".join(path), None
        m = re.search(r"layers_(\d+)", joined)
        if m:
            joined, index = joined.replace(m[0], "layers_{i}"), m[1]
        key, layout = table[joined]
        plan[path] = Plan(key.format(p=prefix, i=index), layout, tuple(leaf.shape))
    return plan


def expected_shapes(plan: dict[tuple[str, ...], Plan],
                    layouts: dict[str, Layout] = LAYOUTS) -> Shapes:
    """Stored key -> the shape the checkpoint must hold for `plan`."""
    return {p.key: tuple(layouts[p.layout].stored_shape(p.shape)) for p in plan.values()}


def table_readers(tensors: Tensors, plan: dict[tuple[str, ...], Plan],
                  layouts: dict[str, Layout] = LAYOUTS) -> Readers:
    """Flax leaf path -> zero-argument reader of that leaf (Flax layout, stored dtype)."""
    def reader(p: Plan) -> Callable[[], np.ndarray]:
        return lambda: layouts[p.layout].to_flax(tensors.read(p.key))
    return {path: reader(p) for path, p in plan.items()}


def _check_present(source: str, tensors: Tensors, expected: Shapes, what: str) -> None:
    """Missing or mis-shaped tensors of `expected` (other tensors may be in the file)."""
    found = {k: tensors.shapes[k] for k in expected if k in tensors}
    check_shapes(source, found, expected, what, _HINT)


def _text_what(c: CLIPTextConfig) -> str:
    return (f"CLIP text model (hidden {c.hidden_size}, {c.num_layers} layers, "
            f"projection {c.projection_dim})")


def _vision_what(c: CLIPVisionConfig) -> str:
    return (f"CLIP vision model (hidden {c.hidden_size}, {c.num_layers} layers, patch "
            f"{c.patch_size}, image {c.image_size}, projection {c.projection_dim})")


def clip_text_readers(tensors: Tensors, config: CLIPTextConfig, prefix: str = "text_model.",
                      *, source: str = "checkpoint") -> Readers:
    """Readers of a CLIPTextModel's params (tree of `CLIPTextModel(config)`).

    `prefix` is the tower's key prefix ("text_model." or ""); the projection, if
    `config.projection_dim` is set, is read from `text_projection.weight`. Raises one
    ValueError (first line naming `source`) listing missing or mis-shaped tensors.
    """
    plan = plan_from_table(abstract_params(config), HF_TEXT_KEYS, prefix)
    _check_present(source, tensors, expected_shapes(plan), _text_what(config))
    return table_readers(tensors, plan)


def clip_vision_readers(tensors: Tensors, config: CLIPVisionConfig,
                        prefix: str = "vision_model.", *,
                        source: str = "checkpoint") -> Readers:
    """Readers of a CLIPVisionModel's params (tree of `CLIPVisionModel(config)`).

    Same conventions as `clip_text_readers`; the projection is `visual_projection.weight`.
    """
    plan = plan_from_table(abstract_params(config), HF_VISION_KEYS, prefix)
    _check_present(source, tensors, expected_shapes(plan), _vision_what(config))
    return table_readers(tensors, plan)


# ----------------------------------------------------------------------------- configs


def _int(cfg: dict, key: str, default: Any, file: str) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{file}: {key} must be an integer, got {value!r}; fix config.json")
    return value


def _has_projection(cfg: dict, tensors: Tensors, key: str) -> bool:
    """From `architectures` (…WithProjection), else from the tensors present."""
    architectures = cfg.get("architectures") or []
    if architectures:
        return any(str(a).endswith("WithProjection") for a in architectures)
    return key in tensors


def text_config_from_hf(cfg: dict, file: str, projection_dim: int | None) -> CLIPTextConfig:
    """A CLIPTextConfig from HF `CLIPTextConfig` fields (defaults: transformers 5's)."""
    try:
        return CLIPTextConfig(
            vocab_size=_int(cfg, "vocab_size", 49408, file),
            hidden_size=_int(cfg, "hidden_size", 512, file),
            intermediate_size=_int(cfg, "intermediate_size", 2048, file),
            num_layers=_int(cfg, "num_hidden_layers", 12, file),
            num_heads=_int(cfg, "num_attention_heads", 8, file),
            max_position_embeddings=_int(cfg, "max_position_embeddings", 77, file),
            hidden_act=cfg.get("hidden_act", "quick_gelu"),
            layer_norm_eps=float(cfg.get("layer_norm_eps") or 1e-5),
            eos_token_id=_int(cfg, "eos_token_id", 49407, file),
            projection_dim=projection_dim)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from err


def vision_config_from_hf(cfg: dict, file: str,
                          projection_dim: int | None) -> CLIPVisionConfig:
    """A CLIPVisionConfig from HF `CLIPVisionConfig` fields (defaults: transformers 5's)."""
    try:
        return CLIPVisionConfig(
            hidden_size=_int(cfg, "hidden_size", 768, file),
            intermediate_size=_int(cfg, "intermediate_size", 3072, file),
            num_layers=_int(cfg, "num_hidden_layers", 12, file),
            num_heads=_int(cfg, "num_attention_heads", 12, file),
            image_size=_int(cfg, "image_size", 224, file),
            patch_size=_int(cfg, "patch_size", 32, file),
            num_channels=_int(cfg, "num_channels", 3, file),
            hidden_act=cfg.get("hidden_act", "quick_gelu"),
            layer_norm_eps=float(cfg.get("layer_norm_eps") or 1e-5),
            projection_dim=projection_dim)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from err


def _sub_config(cfg: dict, name: str) -> dict:
    """`text_config` / `vision_config`, or the legacy `*_config_dict` when present: transformers
    then rebuilds the tower config from that dict and its defaults alone (`CLIPConfig`)."""
    legacy = cfg.get(f"{name}_config_dict")
    return dict(legacy if legacy is not None else cfg.get(f"{name}_config") or {})


def _model_type_error(file: str, found: Any, expected: str, loader: str) -> ValueError:
    fixes = {
        "clip_text_model": "it is a CLIP text model: use load_clip_text",
        "clip_vision_model": "it is a CLIP vision model: use load_clip_vision",
        "clip": "it is a full CLIP model: use load_clip",
        "t5": "it is T5: pass FLUX's text_encoder/ (CLIP-L), not text_encoder_2/ (T5)",
    }
    fix = fixes.get(found, f"pass a folder saved by transformers' CLIP classes for {loader}")
    return ValueError(f"{file}: model_type {found!r} is not {expected!r}; {fix}")


def _config_json(folder: str, expected: str, loader: str) -> tuple[str, dict]:
    file = os.path.join(folder, "config.json")
    cfg = read_json(file)
    if cfg.get("model_type") != expected:
        raise _model_type_error(file, cfg.get("model_type"), expected, loader)
    return file, cfg


def _folder(path: str | os.PathLike, subfolder: str | None = None) -> str:
    """The folder holding config.json: `path` itself or `path/subfolder` (a pipeline)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"CLIP checkpoint folder not found: {path}")
    candidates = [path] + ([os.path.join(path, subfolder)] if subfolder else [])
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    where = f"{path} or {candidates[-1]}" if subfolder else path
    raise FileNotFoundError(f"no config.json in {where}; pass a folder saved by transformers' "
                            "save_pretrained")


def _prefix(tensors: Tensors, prefix: str, probe: str) -> str:
    """`prefix` (transformers 4), or "" when only the unprefixed key (transformers 5) exists."""
    return "" if prefix + probe not in tensors and probe in tensors else prefix


def _stored(tensors: Tensors) -> Shapes:
    """Stored shapes without the `position_ids` buffers some versions save."""
    return {k: s for k, s in tensors.shapes.items() if not k.endswith("position_ids")}


def _load(folder: str, plan: dict[tuple[str, ...], Plan], tensors: Tensors, what: str,
          dtype: Any) -> Params:
    check_shapes(folder, _stored(tensors), expected_shapes(plan), what, _HINT)
    return materialize(table_readers(tensors, plan), dtype)


# ----------------------------------------------------------------------------- public


def load_clip_text(path: str | os.PathLike, *,
                   dtype: Any = np.float32) -> tuple[CLIPTextConfig, Params]:
    """Loads a CLIPTextModel(WithProjection) folder as `(config, params)`.

    `params` is the plain tree for `CLIPTextModel(config).apply({"params": params}, ids)`;
    with a projection (`CLIPTextModelWithProjection`) it holds `text_projection` too.

    Args:
      path: the text encoder folder (`config.json` + `model*.safetensors`), or a FLUX
        pipeline folder holding it as `text_encoder/`.
      dtype: numpy dtype of the returned arrays (np.float32, or ml_dtypes.bfloat16).
        The config's compute dtype is float32; `dataclasses.replace` it for bf16 / remat.

    Raises:
      FileNotFoundError: the folder, config.json or the weights are missing.
      ValueError: another model family, an invalid config, or tensors that are missing,
        unexpected or mis-shaped (all listed in one message whose first line names the
        folder).
    """
    dtype = float_dtype(dtype)
    folder = _folder(path, "text_encoder")
    file, cfg = _config_json(folder, "clip_text_model", "load_clip_text")
    with contextlib.ExitStack() as stack:
        tensors = Tensors(weight_files(folder, _WEIGHTS, _INDEX), stack)
        projection = _has_projection(cfg, tensors, "text_projection.weight")
        config = text_config_from_hf(
            cfg, file, _int(cfg, "projection_dim", 512, file) if projection else None)
        prefix = _prefix(tensors, "text_model.", "embeddings.token_embedding.weight")
        plan = plan_from_table(abstract_params(config), HF_TEXT_KEYS, prefix)
        return config, _load(folder, plan, tensors, _text_what(config), dtype)


def load_clip_vision(path: str | os.PathLike, *,
                     dtype: Any = np.float32) -> tuple[CLIPVisionConfig, Params]:
    """Loads a CLIPVisionModel(WithProjection) folder as `(config, params)`.

    `params` is the plain tree for `CLIPVisionModel(config).apply(...)`; with a projection
    it holds `visual_projection` too. Same arguments and errors as `load_clip_text`.
    """
    dtype = float_dtype(dtype)
    folder = _folder(path)
    file, cfg = _config_json(folder, "clip_vision_model", "load_clip_vision")
    with contextlib.ExitStack() as stack:
        tensors = Tensors(weight_files(folder, _WEIGHTS, _INDEX), stack)
        projection = _has_projection(cfg, tensors, "visual_projection.weight")
        config = vision_config_from_hf(
            cfg, file, _int(cfg, "projection_dim", 512, file) if projection else None)
        prefix = _prefix(tensors, "vision_model.", "embeddings.patch_embedding.weight")
        plan = plan_from_table(abstract_params(config), HF_VISION_KEYS, prefix)
        return config, _load(folder, plan, tensors, _vision_what(config), dtype)


def read_clip_config(path: str | os.PathLike) -> CLIPConfig:
    """The CLIPConfig of a full CLIPModel folder (model_type "clip"), from config.json."""
    folder = _folder(path)
    file, cfg = _config_json(folder, "clip", "load_clip")
    projection_dim = _int(cfg, "projection_dim", 512, file)
    text = text_config_from_hf(_sub_config(cfg, "text"), file, projection_dim)
    vision = vision_config_from_hf(_sub_config(cfg, "vision"), file, projection_dim)
    try:
        return CLIPConfig(text, vision, float(cfg.get("logit_scale_init_value", 2.6592)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from err


def load_clip(path: str | os.PathLike, *, dtype: Any = np.float32) -> tuple[CLIPConfig, Params]:
    """Loads a full CLIPModel folder (model_type "clip") as `(config, params)`.

    `config` is a `CLIPConfig` (`.text`, `.vision`, `.logit_scale_init`); `params` is the
    plain tree for `CLIPModel(config).apply({"params": params}, ...)`:

        {"text_model":   {... CLIPTextModel tree ..., "text_projection": {"kernel"}},
         "vision_model": {... CLIPVisionModel tree ..., "visual_projection": {"kernel"}},
         "logit_scale":  ()  # the stored log scale}

    so `params["text_model"]` / `params["vision_model"]` also serve
    `CLIPTextModel(config.text)` / `CLIPVisionModel(config.vision)` alone. Arguments and
    errors as `load_clip_text`.
    """
    dtype = float_dtype(dtype)
    folder = _folder(path)
    config = read_clip_config(folder)
    with contextlib.ExitStack() as stack:
        tensors = Tensors(weight_files(folder, _WEIGHTS, _INDEX), stack)
        abstract = abstract_params(config)
        plan = {("logit_scale",): Plan("logit_scale", "copy", ())}
        for name, table, prefix in (("text_model", HF_TEXT_KEYS, _CLIP_TEXT_PREFIX),
                                    ("vision_model", HF_VISION_KEYS, _CLIP_VISION_PREFIX)):
            plan |= {(name,) + path: p
                     for path, p in plan_from_table(abstract[name], table, prefix).items()}
        what = (f"CLIPModel (text: {_text_what(config.text)}; vision: "
                f"{_vision_what(config.vision)})")
        return config, _load(folder, plan, tensors, what, dtype)
