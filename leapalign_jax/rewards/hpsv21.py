"""HPSv2.1: OpenCLIP ViT-H-14 fine-tuned on human preferences (`HPS_v2.1_compressed.pt`).

The checkpoint is a torch pickle `{"state_dict": {...}}` in OpenCLIP's layout (possibly
fp16), read without torch by `leapalign_jax.weights.torch_pickle`, or a `.safetensors` file
holding the same keys (a converted checkpoint, or the tiny ones of
`leapalign_jax.weights.tiny_judges`). Its keys are mapped onto
the Flax CLIP towers of `leapalign_jax.models.clip` (HF layout):

- `[visual.]transformer.resblocks.{i}.attn.in_proj_weight` / `in_proj_bias` (q, k, v
  stacked along torch's out dim, the order of `nn.MultiheadAttention`) -> q/k/v_proj;
  `attn.out_proj` -> out_proj; `ln_1` / `ln_2` -> layer_norm1 / 2; `mlp.c_fc` / `c_proj`
  -> mlp.fc1 / fc2;
- text: `token_embedding.weight`, `positional_embedding`, `ln_final`, `text_projection`
  (width, embed), already a Flax kernel (in, out);
- vision: `visual.conv1.weight` -> patch_embedding, `visual.class_embedding`,
  `visual.positional_embedding`, `visual.ln_pre` / `ln_post` -> pre_layrnorm /
  post_layernorm, `visual.proj` (width, embed) -> visual_projection;
- `logit_scale` (the log), unused by the score.

Widths, depths, patch and image size are read from the tensor shapes (so tiny test
checkpoints load); the head counts are not in the shapes and default to ViT-H-14's (16
and 16). OpenCLIP's text tower is causal and pools at `argmax(ids)` (the EOT token has the
largest id): the text config uses the legacy EOS id, which selects that rule. The
activation is exact (erf) GELU, OpenCLIP's default for ViT-H-14.

Score (as HPSv2 reports it): the cosine of the L2-normalised image and text embeddings,
no logit scale. Images go through OpenCLIP's validation transform: shorter side to 224
(bicubic, antialiased), torchvision's centre crop (rounded offsets), CLIP normalisation.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

import numpy as np

from leapalign_jax.models.clip import (LEGACY_EOS_TOKEN_ID, CLIPConfig, CLIPTextConfig,
                                       CLIPVisionConfig, abstract_params)
from leapalign_jax.rewards.base import (Reward, cosine_scorer, load_tokenizer, text_embedder,
                                        to_device, with_compute)
from leapalign_jax.weights.clip import (LAYOUTS, Layout, Plan, Table, expected_shapes,
                                        plan_from_table, table_readers)
from leapalign_jax.weights.files import Tensors, check_shapes, materialize
from leapalign_jax.weights.torch_pickle import TorchTensors

Params = dict[str, Any]
NAME = "hpsv21"
CROP = "round"  # torchvision CenterCrop in OpenCLIP's transform
_HINT = ("pass HPS_v2.1_compressed.pt (an OpenCLIP ViT state dict); a truncated download "
         "also gives this")


def _third(index: int, kernel: bool) -> Layout:
    """One of q, k, v out of a fused `in_proj_weight` (3w, w) / `in_proj_bias` (3w,)."""
    def to_flax(a: np.ndarray) -> np.ndarray:
        n = a.shape[0] // 3
        part = a[index * n:(index + 1) * n]
        return part.T if kernel else part

    def stored_shape(s: tuple[int, ...]) -> tuple[int, ...]:
        return (3 * s[1], s[0]) if kernel else (3 * s[0],)

    return Layout(to_flax, stored_shape)


OPENCLIP_LAYOUTS: dict[str, Layout] = {
    **LAYOUTS,
    **{f"in_proj_{n}_weight": _third(i, True) for i, n in enumerate("qkv")},
    **{f"in_proj_{n}_bias": _third(i, False) for i, n in enumerate("qkv")},
}


def _linear(flax_path: str, key: str) -> Table:
    return {f"{flax_path}/kernel": (f"{key}.weight", "linear"),
            f"{flax_path}/bias": (f"{key}.bias", "copy")}


def _norm(flax_path: str, key: str) -> Table:
    return {f"{flax_path}/scale": (f"{key}.weight", "copy"),
            f"{flax_path}/bias": (f"{key}.bias", "copy")}


def _layer_keys() -> Table:
    layer, key = "encoder/layers_{i}", "{p}transformer.resblocks.{i}"
    table: Table = {}
    for n in "qkv":
        table[f"{layer}/self_attn/{n}_proj/kernel"] = (f"{key}.attn.in_proj_weight",
                                                       f"in_proj_{n}_weight")
        table[f"{layer}/self_attn/{n}_proj/bias"] = (f"{key}.attn.in_proj_bias",
                                                     f"in_proj_{n}_bias")
    table |= _linear(f"{layer}/self_attn/out_proj", f"{key}.attn.out_proj")
    table |= _linear(f"{layer}/mlp/fc1", f"{key}.mlp.c_fc")
    table |= _linear(f"{layer}/mlp/fc2", f"{key}.mlp.c_proj")
    table |= _norm(f"{layer}/layer_norm1", f"{key}.ln_1")
    table |= _norm(f"{layer}/layer_norm2", f"{key}.ln_2")
    return table


# Flax leaf path inside a tower -> (OpenCLIP key, layout); "{p}" = "" or "visual.".
OPENCLIP_TEXT_KEYS: Table = {
    "embeddings/token_embedding/embedding": ("token_embedding.weight", "copy"),
    "embeddings/position_embedding/embedding": ("positional_embedding", "copy"),
    **_layer_keys(),
    **_norm("final_layer_norm", "ln_final"),
    "text_projection/kernel": ("text_projection", "copy"),  # (width, embed) = (in, out)
}
OPENCLIP_VISION_KEYS: Table = {
    "embeddings/class_embedding": ("{p}class_embedding", "copy"),
    "embeddings/patch_embedding/kernel": ("{p}conv1.weight", "conv"),
    "embeddings/position_embedding/embedding": ("{p}positional_embedding", "copy"),
    **_norm("pre_layrnorm", "{p}ln_pre"),
    **_layer_keys(),
    **_norm("post_layernorm", "{p}ln_post"),
    "visual_projection/kernel": ("{p}proj", "copy"),  # (width, embed) = (in, out)
}


def _depth(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.ln_1\.weight")
    indices = [int(m[1]) for k in shapes if (m := pattern.fullmatch(k))]
    return max(indices) + 1 if indices else 0


def openclip_config(shapes: dict[str, tuple[int, ...]], file: str, *, text_heads: int = 16,
                    vision_heads: int = 16, hidden_act: str = "gelu") -> CLIPConfig:
    """The CLIPConfig of an OpenCLIP state dict, from its tensor shapes.

    Raises a one-line ValueError naming `file` when the tensors that fix the sizes are
    missing or inconsistent (not an OpenCLIP ViT checkpoint).
    """
    needed = ("token_embedding.weight", "positional_embedding", "text_projection",
              "visual.conv1.weight", "visual.positional_embedding", "visual.proj",
              "transformer.resblocks.0.mlp.c_fc.weight",
              "visual.transformer.resblocks.0.mlp.c_fc.weight")
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise ValueError(f"{file}: not an OpenCLIP ViT state dict (no {missing[0]}; found "
                         f"{sorted(shapes)[:4]}...); {_HINT}")
    try:
        vocab, width = shapes["token_embedding.weight"]
        patch = shapes["visual.conv1.weight"][2]
        grid = int(round((shapes["visual.positional_embedding"][0] - 1) ** 0.5))
        text = CLIPTextConfig(
            vocab_size=vocab, hidden_size=width,
            intermediate_size=shapes["transformer.resblocks.0.mlp.c_fc.weight"][0],
            num_layers=_depth(shapes, ""), num_heads=text_heads,
            max_position_embeddings=shapes["positional_embedding"][0],
            hidden_act=hidden_act, eos_token_id=LEGACY_EOS_TOKEN_ID,  # argmax(ids) pooling
            projection_dim=shapes["text_projection"][1])
        vision = CLIPVisionConfig(
            hidden_size=shapes["visual.conv1.weight"][0],
            intermediate_size=shapes["visual.transformer.resblocks.0.mlp.c_fc.weight"][0],
            num_layers=_depth(shapes, "visual."), num_heads=vision_heads,
            image_size=grid * patch, patch_size=patch,
            num_channels=shapes["visual.conv1.weight"][1], hidden_act=hidden_act,
            projection_dim=shapes["visual.proj"][1])
        return CLIPConfig(text, vision)
    except (ValueError, IndexError, TypeError) as err:
        raise ValueError(f"{file}: tensor shapes do not form an OpenCLIP ViT ({err}); "
                         f"{_HINT}") from err


def openclip_plan(config: CLIPConfig) -> dict[tuple[str, ...], Plan]:
    """Flax leaf path (CLIPModel tree) -> where it lives in an OpenCLIP state dict."""
    abstract = abstract_params(config)
    plan = {("logit_scale",): Plan("logit_scale", "copy", ())}
    for name, table, prefix in (("text_model", OPENCLIP_TEXT_KEYS, ""),
                                ("vision_model", OPENCLIP_VISION_KEYS, "visual.")):
        plan |= {(name,) + path: p
                 for path, p in plan_from_table(abstract[name], table, prefix).items()}
    return plan


def open_state_dict(file: str, stack: contextlib.ExitStack) -> Tensors | TorchTensors:
    """The tensors of a `.safetensors` file, or else of a `torch.save` file (no torch)."""
    if file.endswith(".safetensors"):
        return Tensors([file], stack)
    return stack.enter_context(TorchTensors(file))


def load_openclip(file: str | os.PathLike, *, dtype: Any = np.float32, text_heads: int = 16,
                  vision_heads: int = 16,
                  hidden_act: str = "gelu") -> tuple[CLIPConfig, Params]:
    """An OpenCLIP ViT checkpoint (torch pickle, or `.safetensors` with the same keys) as
    `(CLIPConfig, CLIPModel params)` (the tree of `leapalign_jax.weights.clip.load_clip`).

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a torch.save / safetensors file, not an OpenCLIP ViT state dict, or
        missing / mis-shaped tensors (one message; its first line names the file and the fix).
    """
    file = os.fspath(file)
    with contextlib.ExitStack() as stack:
        tensors = open_state_dict(file, stack)
        config = openclip_config(tensors.shapes, file, text_heads=text_heads,
                                 vision_heads=vision_heads, hidden_act=hidden_act)
        plan = openclip_plan(config)
        expected = expected_shapes(plan, OPENCLIP_LAYOUTS)
        found = {k: tensors.shapes[k] for k in expected if k in tensors}
        check_shapes(file, found, expected,
                     f"OpenCLIP ViT (text width {config.text.hidden_size}, vision width "
                     f"{config.vision.hidden_size})", _HINT)
        return config, materialize(table_readers(tensors, plan, OPENCLIP_LAYOUTS), dtype)


def load(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
         dtype: str = "float32", remat: str = "none", text_heads: int = 16,
         vision_heads: int = 16) -> Reward:
    """The HPSv2.1 reward from `HPS_v2.1_compressed.pt`.

    Args:
      path: the torch checkpoint (`{"state_dict": ...}` in OpenCLIP's layout), or a
        `.safetensors` file with the same keys.
      tokenizer: a CLIP tokenizer folder (vocab.json + merges.txt); OpenCLIP's BPE is
        OpenAI's, so FLUX.1's `tokenizer/` or openai/clip-vit-large-patch14 serve.
      dtype: compute dtype of the towers, "float32" or "bfloat16" (params stay float32).
      remat: rematerialisation of each vision layer ("none", "full", "dots_saveable").
      text_heads, vision_heads: attention heads (not recorded in the checkpoint).
    """
    if tokenizer is None:
        raise ValueError(f"{NAME}: pass tokenizer= a CLIP tokenizer folder (vocab.json + "
                         "merges.txt); the OpenCLIP checkpoint has none")
    config, params = load_openclip(path, text_heads=text_heads, vision_heads=vision_heads)
    tokenize = load_tokenizer(tokenizer, config.text.max_position_embeddings, NAME)
    vision = with_compute(config.vision, dtype, remat)
    text = with_compute(config.text, dtype, "none")
    return Reward(
        name=NAME,
        params=to_device({"vision_model": params["vision_model"],
                          "logit_scale": params["logit_scale"]}),
        text_params=to_device(params["text_model"]),
        score=cosine_scorer(vision, CROP, logit_scaled=False),
        embed_text=text_embedder(text),
        tokenize=tokenize)
