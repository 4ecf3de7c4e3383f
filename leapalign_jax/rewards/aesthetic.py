"""The LAION aesthetic predictor (improved-aesthetic-predictor, `sac+logos+ava1-l14-linearMSE`).

The OpenAI CLIP ViT-L/14 image embedding, L2-normalised, goes through a purely linear MLP:

    Linear(768, 1024) -> Dropout -> Linear(1024, 128) -> Dropout -> Linear(128, 64)
    -> Dropout -> Linear(64, 16) -> Linear(16, 1)

(no activations; dropout is the identity at inference). The head is a torch pickle of
that module's state dict (keys `layers.{0,2,4,6,7}.weight|bias`), read without torch, or a
`.safetensors` file with the same keys; the widths come from its shapes. The backbone is a
transformers CLIP folder: a full `CLIPModel` (openai/clip-vit-large-patch14, of which only
the vision tower is read) or a `CLIPVisionModelWithProjection`. Images are preprocessed as
OpenAI CLIP's transform does (shorter side 224, bicubic with antialiasing, torchvision
centre crop, CLIP normalisation). The score is the predicted rating (about 1-10); prompts
are ignored.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from leapalign_jax.models.clip import CLIPVisionConfig
from leapalign_jax.rewards.base import (Params, Reward, image_embedder, load_clip_folder,
                                        to_device, with_compute)
from leapalign_jax.weights.clip import load_clip_vision
from leapalign_jax.weights.files import cast, check_shapes, read_json
from leapalign_jax.rewards.hpsv21 import open_state_dict

NAME = "aesthetic"
CROP = "round"  # torchvision CenterCrop in OpenAI CLIP's transform
LAYERS = (0, 2, 4, 6, 7)  # the Linear layers of the nn.Sequential (dropouts in between)
_HINT = ("pass the LAION aesthetic head (sac+logos+ava1-l14-linearMSE.pth, the state dict "
         "of its nn.Sequential)")


class AestheticHead(nn.Module):
    """The linear MLP; `widths` are the outputs of layers 0, 2, 4, 6, 7 (the last is 1)."""

    widths: tuple[int, ...] = (1024, 128, 64, 16, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, embed) normalised embeddings -> (B,) ratings."""
        for n, (index, width) in enumerate(zip(LAYERS, self.widths)):
            axes = ("embed", "mlp") if n == 0 else ("mlp", None)
            x = nn.Dense(
                width, dtype=jnp.float32, param_dtype=jnp.float32, name=f"layers_{index}",
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                       axes[1:]))(x)
        return x[..., 0]


def load_head(file: str | os.PathLike) -> tuple[int, tuple[int, ...], Params]:
    """The head's state dict (torch pickle or `.safetensors`) -> (input width, layer widths,
    Flax params).

    Keys may carry the `layers.` prefix (the LAION module) or not (a bare Sequential).
    """
    file = os.fspath(file)
    with contextlib.ExitStack() as stack:
        tensors = open_state_dict(file, stack)
        prefix = "layers." if "layers.0.weight" in tensors else ""
        first = tensors.shapes.get(f"{prefix}0.weight")
        if first is None or len(first) != 2:
            raise ValueError(f"{file}: no layers.0.weight matrix (found "
                             f"{sorted(tensors.shapes)[:4]}...); {_HINT}")
        expected, widths, width_in = {}, [], first[1]
        for index in LAYERS:
            shape = tensors.shapes.get(f"{prefix}{index}.weight", (None, None))
            out = shape[0] if len(shape) == 2 else None
            expected[f"{prefix}{index}.weight"] = (out, widths[-1] if widths else width_in)
            expected[f"{prefix}{index}.bias"] = (out,)
            widths.append(out)
        if widths[-1] is not None:
            expected[f"{prefix}{LAYERS[-1]}.weight"] = (1, widths[-2])
            expected[f"{prefix}{LAYERS[-1]}.bias"] = (1,)
        found = dict(tensors.shapes)
        check_shapes(file, found, expected, "the LAION aesthetic MLP (5 Linear layers, one "
                     "output)", _HINT)
        params = {f"layers_{i}": {"kernel": cast(tensors.read(f"{prefix}{i}.weight"),
                                                 np.float32, transpose=True),
                                  "bias": cast(tensors.read(f"{prefix}{i}.bias"), np.float32)}
                  for i in LAYERS}
    return width_in, tuple(widths), params


def load_backbone(path: str | os.PathLike) -> tuple[CLIPVisionConfig, Params]:
    """The vision tower (with its projection) of a CLIPModel or
    CLIPVisionModelWithProjection folder."""
    folder = os.fspath(path)
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{NAME}: no config.json in {folder}; pass backbone= a "
                                "transformers CLIP folder (openai/clip-vit-large-patch14)")
    if read_json(config_file).get("model_type") == "clip_vision_model":
        config, params = load_clip_vision(folder)
        if config.projection_dim is None:
            raise ValueError(f"{folder}: a CLIPVisionModel without visual_projection; pass a "
                             "CLIPVisionModelWithProjection or a full CLIPModel folder")
        return config, params
    config, params = load_clip_folder(folder, vision_only=True)  # raises for other types
    return config.vision, params["vision_model"]


def load(path: str | os.PathLike, *, backbone: str | os.PathLike | None = None,
         tokenizer: Any = None, dtype: str = "float32", remat: str = "none") -> Reward:
    """The aesthetic reward: `path` is the head (.pth or .safetensors), `backbone` the CLIP
    ViT-L/14 folder.

    `tokenizer` is accepted and ignored (the score does not read prompts); text features
    are (B, 0) arrays so the reward combines with text-conditioned ones.
    """
    if backbone is None:
        raise ValueError(f"{NAME}: pass backbone= the CLIP ViT-L/14 folder "
                         "(openai/clip-vit-large-patch14) whose image embedding the head reads")
    width_in, widths, head = load_head(path)
    config, vision = load_backbone(backbone)
    if width_in != config.projection_dim:
        raise ValueError(f"{path}: the head reads {width_in}-d embeddings but {backbone} gives "
                         f"{config.projection_dim}-d ones; use CLIP ViT-L/14 (768) as backbone")
    embed_images = image_embedder(with_compute(config, dtype, remat), CROP)
    model = AestheticHead(widths)

    def score(params: Params, images: jax.Array, text_features: jax.Array) -> jax.Array:
        del text_features  # prompts do not matter
        return model.apply({"params": params["head"]},
                           embed_images(params["vision_model"], images))

    def tokenize(prompts: Sequence[str]) -> np.ndarray:
        return np.zeros((len(prompts), 0), np.int32)

    def embed_text(text_params: Params, ids: jax.Array) -> jax.Array:
        return jnp.zeros((ids.shape[0], 0), jnp.float32)

    return Reward(name=NAME, params=to_device({"vision_model": vision, "head": head}),
                  text_params={}, score=score, embed_text=embed_text, tokenize=tokenize)
