"""Sampling images from a pipeline, and writing them as PNG files and grids."""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from PIL import Image

from leapalign_jax import flow
from leapalign_jax.pipeline import Batch, Params, Pipeline, conditioned_velocity, initial_noise


def make_sample_fn(pipe: Pipeline, sigmas: np.ndarray | None = None
                   ) -> Callable[[Params, Params, Batch, jax.Array], jax.Array]:
    """`sample(params, frozen, batch, rng) -> images (B, H, W, 3)` in [0, 1] (jitted).

    `sigmas` overrides the training schedule (the paper evaluates with 50 steps).
    """
    sigmas = pipe.sigmas if sigmas is None else sigmas

    @jax.jit
    def sample(params, frozen, batch, rng):
        x0 = initial_noise(rng, batch, pipe)
        x_clean, _ = flow.euler_rollout(conditioned_velocity(pipe, batch), params, x0, sigmas)
        return pipe.decode(frozen, x_clean)

    return sample


def to_uint8(images: Any) -> np.ndarray:
    return (np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_image(image: Any, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path)


def save_grid(images: Any, path: str, columns: int = 8, upscale: int = 1) -> None:
    """Tiles (N, H, W, 3) images into one PNG, a 2-pixel gap between tiles."""
    images = to_uint8(images)
    n, h, w, _ = images.shape
    cols = min(columns, n)
    rows = -(-n // cols)
    grid = np.zeros((rows * (h + 2) - 2, cols * (w + 2) - 2, 3), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = img
    if upscale > 1:
        grid = grid.repeat(upscale, 0).repeat(upscale, 1)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(grid).save(path)
