"""Differentiable CLIP image preprocessing, as the reward models' own pipelines do it.

Every judge (HPSv2.1 through OpenCLIP's torchvision transforms, PickScore / CLIP score
through transformers' `CLIPImageProcessor`, the aesthetic predictor through OpenAI CLIP's
transforms) resizes the shorter side to 224 with antialiased bicubic interpolation, centre
crops 224 x 224 and normalises with the OpenAI CLIP mean and std. Here the same runs on
(B, H, W, 3) images in [0, 1] inside the jitted step, so the reward's gradient reaches the
pixels. `jax.image.resize(..., "bicubic", antialias=True)` is the Keys cubic (a = -0.5)
scaled by the downsampling factor, which is what torch's `F.interpolate(mode="bicubic",
antialias=True)` (and PIL's bicubic) compute.

Sizes follow the references exactly:
- resized size (torchvision `Resize(224)` and HF `shortest_edge`): the short side becomes
  224 and the long side `int(224 * long / short)` (truncated); an image whose short side is
  already 224 is not resampled;
- crop offsets: torchvision's `CenterCrop` uses `int(round((h - 224) / 2))` (Python's round,
  halves to even), HF's `center_crop` `(h - 224) // 2`. They differ when the margin is
  odd and its half rounds up (e.g. 227 -> 2 vs 1): `crop="round"` or `crop="floor"`.
No clamping to [0, 1] after the resize (torchvision does not clamp float tensors either,
and a clamp would cut the gradient).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_ROUNDING = ("round", "floor")  # torchvision CenterCrop, HF CLIPImageProcessor


def resized_size(height: int, width: int, size: int = 224) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to `size` (long side truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def crop_offsets(height: int, width: int, size: int = 224,
                 crop: str = "round") -> tuple[int, int]:
    """(top, left) of the centred `size` x `size` crop of a (height, width) image."""
    if crop not in CROP_ROUNDING:
        raise ValueError(f"unknown crop rounding {crop!r}; use one of {list(CROP_ROUNDING)}")
    if crop == "round":
        return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return (height - size) // 2, (width - size) // 2


def preprocess(images: jax.Array, size: int = 224, crop: str = "round",
               mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> jax.Array:
    """(B, H, W, 3) images in [0, 1] -> (B, size, size, 3) normalised float32 pixels.

    Args:
      images: channels-last RGB in [0, 1] (any float dtype; computed in float32).
      size: the vision tower's input side (224 for every judge here).
      crop: "round" (torchvision / OpenCLIP / OpenAI CLIP) or "floor" (transformers).
      mean, std: per-channel normalisation (OpenAI CLIP's by default).

    Differentiable in `images`; the shapes are static, so this traces once per input size.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) RGB in [0, 1], got shape {images.shape}; "
                         "transpose channels-first images")
    b, h, w, c = images.shape
    x = images.astype(jnp.float32)
    new_h, new_w = resized_size(h, w, size)
    if (new_h, new_w) != (h, w):
        x = jax.image.resize(x, (b, new_h, new_w, c), "bicubic", antialias=True)
    top, left = crop_offsets(new_h, new_w, size, crop)
    x = x[:, top:top + size, left:left + size]
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
