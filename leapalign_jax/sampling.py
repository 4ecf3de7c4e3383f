"""Sampling images from a pipeline (on one device or a multi-host mesh), and writing them as
PNG files and captioned grids through `paths` (local or gs://)."""

from __future__ import annotations

import textwrap
from typing import Any, Callable, Sequence

import jax
import numpy as np

from leapalign_jax import flow, parallel, paths
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


def on_mesh(fn: Callable[..., Any], mesh: jax.sharding.Mesh | None, params: Params,
            frozen: Params, batch: Batch, *rest: Any) -> Any:
    """`fn(params, frozen, batch, *rest)` with the batch split over the mesh's data axes,
    returning host numpy arrays gathered from every process.

    Every process calls it with the same global `batch` (evaluation prompts are fixed);
    each device computes its rows and `process_allgather` brings all rows to every host.
    With no mesh (one device) it is `fn` plus `device_get`.
    """
    if mesh is None or jax.device_count() == 1:
        return jax.device_get(fn(params, frozen, batch, *rest))
    from jax.experimental import multihost_utils

    def place(x):  # arrays already on this mesh stay; host arrays are replicated on it
        on = isinstance(x, jax.Array) and getattr(x.sharding, "mesh", None) == mesh
        return x if on else parallel.replicate(x, mesh)

    params, frozen, rest = jax.tree.map(place, (params, frozen, rest))
    out = fn(params, frozen, parallel.shard_batch(batch, mesh), *rest)
    return multihost_utils.process_allgather(out, tiled=True)


def to_uint8(images: Any) -> np.ndarray:
    return (np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_image(image: Any, path: str) -> None:
    paths.write_png(path, to_uint8(image))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def grid_image(images: Any, columns: int = 8, upscale: int | None = None,
               captions: Sequence[str] | None = None, min_tile: int = 128) -> np.ndarray:
    """Tiles (N, H, W, 3) images into one (rows, cols) uint8 grid with a 2-pixel gap.

    Tiles are upscaled (nearest neighbour, `upscale` times; by default enough for tiles of
    at least `min_tile` pixels) so that 32x32 samples can be seen, and each tile's caption
    (its prompt) is written under it, wrapped to the tile width.
    """
    from PIL import Image, ImageDraw

    images = to_uint8(images)
    n, h, w, _ = images.shape
    if upscale is None:
        upscale = max(1, -(-min_tile // max(h, w)))
    h, w = h * upscale, w * upscale
    images = images.repeat(upscale, 1).repeat(upscale, 2)
    font, size = None, max(10, min(14, w // 12))
    wrapped = []
    if captions is not None:
        font = _font(size)
        chars = max(8, int(w / (0.6 * size)))
        wrapped = [textwrap.wrap(str(c), chars)[:4] for c in captions]
    caption_h = (max((len(lines) for lines in wrapped), default=0) * (size + 3) + 4
                 if wrapped else 0)
    cols = min(columns, n)
    rows = -(-n // cols)
    cell_h, cell_w = h + caption_h + 2, w + 2
    canvas = Image.new("RGB", (cols * cell_w - 2, rows * cell_h - 2), (255, 255, 255)
                       if wrapped else (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas.paste(Image.fromarray(img), (c * cell_w, r * cell_h))
        for k, line in enumerate(wrapped[i] if i < len(wrapped) else ()):
            draw.text((c * cell_w + 2, r * cell_h + h + 2 + k * (size + 3)), line,
                      fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_grid(images: Any, path: str, columns: int = 8, upscale: int | None = None,
              captions: Sequence[str] | None = None) -> np.ndarray:
    """Writes `grid_image(...)` as one PNG at `path` (local or gs://); returns the grid."""
    grid = grid_image(images, columns, upscale, captions)
    paths.write_png(path, grid)
    return grid
