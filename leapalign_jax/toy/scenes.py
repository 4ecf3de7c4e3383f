"""Scenes of the shapes world and their renderer.

An image is 32x32 RGB, float32 in [0, 1] (HWC), on a black background, with 1 to 4
objects. An object is a `shape` ("square", "circle", "triangle": isosceles, apex up) of
one palette `color`, drawn inside a `size` x `size` box (8 to 10 px) at column `x`, row
`y`. Pixels are hard (no antialiasing) and boxes keep a gap of two pixels, so
every object is its own connected component of one exact colour and the checker can
segment it exactly.

The centre of an object is the centre of its box, `(x + size / 2, y + size / 2)`; each
drawn shape touches all four sides of its box, so this is also the centre of the
bounding box of its pixels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("square", "circle", "triangle")
# Exact palette, RGB 0-255; images hold these values / 255.
PALETTE = {
    "red": (230, 40, 40),
    "green": (40, 200, 40),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
}
COLORS = tuple(PALETTE)
MIN_SIZE, MAX_SIZE = 8, 10
MAX_OBJECTS = 4
GAP = 2  # empty pixels kept between boxes: components never touch, even decoded ones
BORDER = 1  # empty pixels kept along the image edge


@dataclasses.dataclass(frozen=True)
class Object:
    """One drawn object: its shape and colour inside the box [x, x+size) x [y, y+size)."""

    shape: str
    color: str
    x: int
    y: int
    size: int

    @property
    def center(self) -> tuple[float, float]:
        """(column, row) of the box centre, in pixels."""
        return (self.x + self.size / 2, self.y + self.size / 2)


@dataclasses.dataclass(frozen=True)
class Scene:
    """What an image shows: a tuple of non-overlapping objects."""

    objects: tuple[Object, ...]


def color_rgb(color: str) -> np.ndarray:
    """The exact palette colour as float32 RGB in [0, 1]."""
    return np.asarray(PALETTE[color], np.float32) / 255.0


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape; pixel (r, c) is tested at its centre."""
    centres = np.arange(size) + 0.5
    rows, cols = np.meshgrid(centres, centres, indexing="ij")
    half = size / 2
    if shape == "square":
        mask = np.ones((size, size), bool)
    elif shape == "circle":
        mask = (rows - half) ** 2 + (cols - half) ** 2 <= half ** 2
    elif shape == "triangle":
        # Apex at the top centre, base along the bottom row: the half-width grows
        # linearly from half a pixel on the top row to `half` on the bottom row.
        mask = np.abs(cols - half) <= (rows + 0.5) / 2
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")
    mask.setflags(write=False)
    return mask


def render(scene: Scene) -> np.ndarray:
    """Draws a scene: float32 (32, 32, 3) in [0, 1], exact palette colours, hard pixels."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    for obj in scene.objects:
        box = image[obj.y:obj.y + obj.size, obj.x:obj.x + obj.size]
        box[shape_mask(obj.shape, obj.size)] = color_rgb(obj.color)
    return image


def render_batch(batch: Sequence[Scene]) -> np.ndarray:
    """Renders scenes into float32 (B, 32, 32, 3)."""
    return np.stack([render(s) for s in batch]) if batch else np.zeros(
        (0, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)


def _apart(a: Object, b: Object) -> bool:
    """Whether two boxes keep at least GAP empty pixels between them on some axis."""
    return (a.x + a.size + GAP <= b.x or b.x + b.size + GAP <= a.x
            or a.y + a.size + GAP <= b.y or b.y + b.size + GAP <= a.y)


def place(rng: np.random.Generator, kinds: Sequence[tuple[str, str]],
          accept: Callable[[tuple[Object, ...]], bool] | None = None,
          max_tries: int = 1000) -> Scene:
    """Samples sizes and positions for `kinds` = [(color, shape), ...], in that order.

    Objects never overlap (boxes GAP px apart) and stay BORDER px inside the image.
    `accept` adds a constraint on the placed objects (e.g. a spatial relation); layouts
    are drawn by rejection until it holds.
    """
    if not 1 <= len(kinds) <= MAX_OBJECTS:
        raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(kinds)}")
    for color, shape in kinds:
        if color not in PALETTE or shape not in SHAPES:
            raise ValueError(f"unknown object ({color!r}, {shape!r}); colours are {COLORS}, "
                             f"shapes {SHAPES}")
    for _ in range(max_tries):
        objects: list[Object] = []
        for color, shape in kinds:
            size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
            high = IMAGE_SIZE - BORDER - size + 1
            for _ in range(50):
                x, y = (int(v) for v in rng.integers(BORDER, high, size=2))
                obj = Object(shape=shape, color=color, x=x, y=y, size=size)
                if all(_apart(obj, o) for o in objects):
                    objects.append(obj)
                    break
            else:
                break  # this layout is too crowded; start it again
        if len(objects) == len(kinds) and (accept is None or accept(tuple(objects))):
            return Scene(tuple(objects))
    raise RuntimeError(f"no layout found for {kinds} in {max_tries} tries")


def sample_scene(rng: np.random.Generator, num_objects: int | None = None) -> Scene:
    """A random scene: 1 to 4 objects (or `num_objects`) of random shape and colour."""
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if num_objects is None else num_objects
    kinds = [(COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))])
             for _ in range(n)]
    return place(rng, kinds)
