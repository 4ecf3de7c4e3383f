"""PickScore: a CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences (yuvalkirstain/PickScore_v1).

A transformers `CLIPModel` folder (`config.json` + `model.safetensors`, or an older
`pytorch_model.bin`, read without torch). The score is PickScore's own:
`exp(logit_scale) * cos(image_embeds, text_embeds)` (about 20 for a good match).
Images are preprocessed as its `CLIPImageProcessor` does (shorter side 224, bicubic with
antialiasing, centre crop with floored offsets, CLIP normalisation). The tokenizer is
laion/CLIP-ViT-H-14-laion2B-s32B-b79K's (OpenAI's BPE): pass its folder as `tokenizer=`
unless the model folder holds one.
"""

from __future__ import annotations

import os

from leapalign_jax.rewards.base import Reward, load_hf_clip_reward

NAME = "pickscore"


def load(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
         dtype: str = "float32", remat: str = "none") -> Reward:
    """The PickScore reward from a `CLIPModel` folder; `dtype` is the compute dtype
    ("float32" / "bfloat16"), `remat` the vision layers' rematerialisation."""
    return load_hf_clip_reward(NAME, path, tokenizer=tokenizer, dtype=dtype, remat=remat,
                               logit_scaled=True)
