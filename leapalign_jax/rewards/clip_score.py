"""CLIP score: the cosine similarity of a CLIP model's image and text embeddings.

Any transformers `CLIPModel` folder (openai/clip-vit-large-patch14 is the usual one),
preprocessed as its `CLIPImageProcessor` does. The function returns the plain cosine, in
[-1, 1], on the same scale as HPSv2; the "CLIPScore" of papers (torchmetrics) is
`100 * max(cosine, 0)`: multiply by 100 when reporting. The clamp is left out so the
gradient never vanishes.
"""

from __future__ import annotations

import os

from leapalign_jax.rewards.base import Reward, load_hf_clip_reward

NAME = "clip_score"


def load(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
         dtype: str = "float32", remat: str = "none") -> Reward:
    """The CLIP-score reward (cosine, not x100) from a `CLIPModel` folder; `tokenizer`
    defaults to the model folder, which openai/clip-vit-large-patch14 ships with."""
    return load_hf_clip_reward(NAME, path, tokenizer=tokenizer, dtype=dtype, remat=remat,
                               logit_scaled=False)
