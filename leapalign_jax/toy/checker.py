"""The exact, non-differentiable checker of the shapes world (numpy).

An image passes a prompt when the objects found in it are exactly the prompt's objects
(`prompts.satisfies`). Objects are found in three steps:

1. Segmentation: each pixel goes to the nearest of black and the four palette colours;
   a pixel farther than `COLOR_THRESHOLD` (RGB distance, [0, 1] scale) from all of
   them is background. Ground-truth renders segment exactly; the threshold gives
   generated and decoded images some slack.
2. Connected components per colour (8-connectivity); blobs under `MIN_PIXELS` pixels
   are ignored. Renders keep a gap between objects, so each object is one component.
3. Shape, by template matching: the component is compared with every shape drawn at
   every size from `TEMPLATE_SIZES` and every offset around its bounding box; the best
   intersection-over-union wins. Ground-truth renders match their template exactly
   (IoU 1). A blob whose best IoU is under `MIN_IOU` (two merged objects, a smear) gets
   shape None and matches nothing. The centre is the bounding-box centre, as for scene
   objects.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import ndimage

from leapalign_jax.toy import prompts as prompts_lib
from leapalign_jax.toy import scenes
from leapalign_jax.toy.prompts import Prompt

COLOR_THRESHOLD = 0.35
MIN_PIXELS = 12
TEMPLATE_SIZES = tuple(range(scenes.MIN_SIZE - 1, scenes.MAX_SIZE + 2))
MIN_IOU = 0.6
_PAD = 2  # templates may stick out of the blob's bounding box by this much

_LABEL_RGB = np.stack([np.zeros(3, np.float32)] + [scenes.color_rgb(c) for c in scenes.COLORS])
_EIGHT = np.ones((3, 3), bool)


@dataclasses.dataclass(frozen=True)
class Detection:
    """One object found in an image."""

    color: str
    shape: str | None
    center: tuple[float, float]  # (column, row) of the bounding-box centre
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive ends
    pixels: int


def segment(image: np.ndarray) -> np.ndarray:
    """int (H, W) labels: 0 background, 1 + index into scenes.COLORS."""
    image = np.asarray(image, np.float32)
    dist = np.linalg.norm(image[..., None, :] - _LABEL_RGB, axis=-1)
    labels = np.argmin(dist, axis=-1)
    labels[np.min(dist, axis=-1) > COLOR_THRESHOLD] = 0
    return labels


def shape_ious(mask: np.ndarray) -> dict[str, float]:
    """Best IoU of a boolean blob (cropped to its bounding box) with each shape's
    templates, over sizes and offsets."""
    canvas = np.pad(mask, _PAD)
    total = mask.sum()
    best = {}
    for shape in scenes.SHAPES:
        best[shape] = 0.0
        for size in TEMPLATE_SIZES:
            if size > min(canvas.shape):
                continue
            template = scenes.shape_mask(shape, size)
            windows = np.lib.stride_tricks.sliding_window_view(canvas, template.shape)
            inter = np.sum(windows & template, axis=(-2, -1))
            iou = inter / (total + template.sum() - inter)
            best[shape] = max(best[shape], float(iou.max()))
    return best


def classify(mask: np.ndarray) -> str | None:
    """Shape of a boolean blob cropped to its bounding box, or None if it is no object."""
    ious = shape_ious(mask)
    shape = max(ious, key=ious.get)
    return shape if ious[shape] >= MIN_IOU else None


def detect(image: np.ndarray) -> list[Detection]:
    """The objects in one (32, 32, 3) image in [0, 1]."""
    labels = segment(image)
    found = []
    for index, color in enumerate(scenes.COLORS, start=1):
        components, n = ndimage.label(labels == index, structure=_EIGHT)
        for sl, k in zip(ndimage.find_objects(components), range(1, n + 1)):
            mask = components[sl] == k
            if mask.sum() < MIN_PIXELS:
                continue
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            found.append(Detection(color=color, shape=classify(mask),
                                   center=((x0 + x1) / 2, (y0 + y1) / 2),
                                   bbox=(x0, y0, x1, y1), pixels=int(mask.sum())))
    return found


def check(image: np.ndarray, prompt: Prompt) -> bool:
    """Whether the image shows exactly what the prompt asks for."""
    return prompts_lib.satisfies(detect(image), prompt)


def score(images: np.ndarray, specs: Sequence[Prompt]) -> dict[str, float]:
    """Accuracy per category present, and "overall" = their mean (GenEval-style).

    Args:
      images: (B, 32, 32, 3) in [0, 1].
      specs: the B prompts the images were made for.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] != len(specs) or images.shape[-1] != 3:
        raise ValueError(f"score needs images (B, H, W, 3) and B prompts; got images "
                         f"{images.shape} and {len(specs)} prompts")
    return summarize([check(image, spec) for image, spec in zip(images, specs)], specs)


def summarize(passed: Sequence[bool], specs: Sequence[Prompt]) -> dict[str, float]:
    """Per-category accuracy of pass/fail results, and "overall" = their mean."""
    hits: dict[str, list[bool]] = {}
    for ok, spec in zip(passed, specs):
        hits.setdefault(spec.category, []).append(bool(ok))
    out = {cat: float(np.mean(hits[cat])) for cat in prompts_lib.CATEGORIES if cat in hits}
    out["overall"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out
