"""Tiny random judge checkpoints in the real layouts, written without torch.

The `:tiny` FLUX run (configs/flux_dev.py) evaluates with every judge the paper reports, so
it needs a checkpoint of each that the real loaders (`leapalign_jax.rewards`) read:

- `write_tiny_clip_folder`: a transformers `CLIPModel` folder (config.json,
  model.safetensors, a CLIP tokenizer), as PickScore, CLIP score and the aesthetic
  backbone ship;
- `write_tiny_openclip`: an OpenCLIP ViT state dict as one safetensors file under the keys
  of `HPS_v2.1_compressed.pt` (`transformer.resblocks.{i}.attn.in_proj_weight`, `visual.*`,
  ...), which `rewards.hpsv21` reads like the torch pickle;
- `write_tiny_aesthetic_head`: the LAION aesthetic MLP's state dict (`layers.{0,2,4,6,7}`)
  as a safetensors file.

Every parameter is random (`flux_folder.random_params`), deterministic in the seed.
"""

from __future__ import annotations

import json
import os

import flax
import numpy as np
from safetensors.numpy import save_file

from leapalign_jax.models import clip as clip_model
from leapalign_jax.weights import flux_folder
from leapalign_jax.weights.clip import HF_TEXT_KEYS, HF_VISION_KEYS, plan_from_table

# Flax layout -> stored (torch) layout, the inverse of weights.clip.LAYOUTS
_TO_STORED = {"copy": lambda a: a, "linear": lambda a: a.T,
              "conv": lambda a: a.transpose(3, 2, 0, 1)}


def _flat(params: dict) -> dict[tuple[str, ...], np.ndarray]:
    return {k: np.asarray(v, np.float32) for k, v in flax.traverse_util.flatten_dict(
        params).items()}


def write_tiny_clip_folder(path: str, seed: int = 0, hidden_act: str = "quick_gelu") -> str:
    """A tiny random transformers `CLIPModel` folder (config.json, model.safetensors, a
    CLIP tokenizer) in the layout `rewards.load_reward("clip_score" | "pickscore", path)`
    and the aesthetic backbone read; projection width 8, 32x32 images in 8x8 patches."""
    os.makedirs(path, exist_ok=True)
    vocab = flux_folder.write_clip_tokenizer(path)  # <|endoftext|> is the largest id
    text = clip_model.CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                     num_layers=1, num_heads=2, eos_token_id=vocab - 1,
                                     hidden_act=hidden_act, projection_dim=8)
    vision = clip_model.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=1,
                                         num_heads=2, image_size=32, patch_size=8,
                                         hidden_act=hidden_act, projection_dim=8)
    config = clip_model.CLIPConfig(text, vision)
    abstract = clip_model.abstract_params(config)
    flat = _flat(flux_folder.random_params(abstract, seed))
    tensors = {"logit_scale": np.asarray(flat[("logit_scale",)] + 2.6592, np.float32)}
    for tower, table, prefix in (("text_model", HF_TEXT_KEYS, "text_model."),
                                 ("vision_model", HF_VISION_KEYS, "vision_model.")):
        for sub, plan in plan_from_table(abstract[tower], table, prefix).items():
            tensors[plan.key] = np.ascontiguousarray(_TO_STORED[plan.layout](flat[(tower,) + sub]))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    common = {"intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "hidden_size": 16, "hidden_act": hidden_act, "layer_norm_eps": 1e-5}
    cfg = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 8,
           "logit_scale_init_value": 2.6592,
           "text_config": dict(common, vocab_size=vocab, max_position_embeddings=77,
                               bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                               pad_token_id=vocab - 1, projection_dim=8),
           "vision_config": dict(common, image_size=32, patch_size=8, num_channels=3,
                                 projection_dim=8)}
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    return path


def write_tiny_openclip(file: str, vocab_size: int, seed: int = 0) -> str:
    """A tiny random OpenCLIP ViT (HPSv2.1's layout: q, k, v fused into `in_proj_*`,
    `text_projection` / `visual.proj` as (width, embed)) as a safetensors file.

    Widths are 32 so ViT-H-14's 16 heads (the loader's default) divide them; the text
    context is 77 and pooling is OpenCLIP's argmax(ids), so `vocab_size` must be that of
    the tokenizer the reward is loaded with (its EOT token the largest id).
    """
    from leapalign_jax.rewards.hpsv21 import openclip_plan  # the loader's key table

    text = clip_model.CLIPTextConfig(vocab_size=vocab_size, hidden_size=32,
                                     intermediate_size=64, num_layers=1, num_heads=16,
                                     hidden_act="gelu", projection_dim=8)
    vision = clip_model.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_layers=1,
                                         num_heads=16, image_size=32, patch_size=8,
                                         hidden_act="gelu", projection_dim=8)
    config = clip_model.CLIPConfig(text, vision)
    flat = _flat(flux_folder.random_params(clip_model.abstract_params(config), seed))
    tensors: dict[str, np.ndarray] = {}
    fused: dict[str, dict[str, np.ndarray]] = {}  # in_proj key -> {"q"|"k"|"v": part}
    for path, plan in openclip_plan(config).items():
        value = flat[path]
        if plan.layout.startswith("in_proj_"):
            part = plan.layout[len("in_proj_")]
            fused.setdefault(plan.key, {})[part] = value.T if value.ndim == 2 else value
        else:
            tensors[plan.key] = _TO_STORED[plan.layout](value)
    tensors["logit_scale"] = flat[("logit_scale",)] + 2.6592
    for key, parts in fused.items():
        tensors[key] = np.concatenate([parts[n] for n in "qkv"], axis=0)
    tensors = {k: np.array(v, np.float32, order="C") for k, v in tensors.items()}
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def write_tiny_aesthetic_head(file: str, width_in: int, seed: int = 0,
                              widths: tuple[int, ...] = (16, 8, 8, 4, 1)) -> str:
    """The LAION aesthetic MLP's state dict (`layers.{0,2,4,6,7}.weight|bias`, torch's
    (out, in) weights) with tiny random widths, as a safetensors file."""
    rng = np.random.default_rng(seed)
    tensors, fan_in = {}, width_in
    for index, width in zip((0, 2, 4, 6, 7), widths):
        weight = rng.standard_normal((width, fan_in)) / np.sqrt(fan_in)
        tensors[f"layers.{index}.weight"] = weight.astype(np.float32)
        tensors[f"layers.{index}.bias"] = (0.5 * rng.standard_normal(width)).astype(np.float32)
        fan_in = width
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    save_file(tensors, file, metadata={"format": "pt"})
    return file
