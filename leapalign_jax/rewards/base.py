"""What every reward model shares: the `Reward` record, CLIP tokenisation, CLIP scoring.

A reward is a pure function of frozen params, images and per-prompt text features:

    score(params, images, text_features) -> (B,)

with images (B, H, W, 3) in [0, 1], differentiable in the images and jittable, so the
train step calls it on decoded samples and backpropagates into the generator. Text
features depend on the prompt only and are computed once per prompt (`encode_text`),
outside the step; the text tower need not stay in device memory during training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from leapalign_jax.models.clip import (CLIPConfig, CLIPTextConfig, CLIPTextModel,
                                       CLIPVisionConfig, CLIPVisionModel, l2_normalize)
from leapalign_jax.rewards.preprocess import preprocess
from leapalign_jax.weights.clip import clip_text_readers, clip_vision_readers, read_clip_config
from leapalign_jax.weights.files import Tensors, materialize, weight_files
from leapalign_jax.weights.torch_pickle import TorchTensors

Params = dict[str, Any]
ScoreFn = Callable[[Params, jax.Array, jax.Array], jax.Array]
EmbedFn = Callable[[Params, jax.Array], jax.Array]
_TOKENIZER_FILES = ("vocab.json", "tokenizer.json")
_WEIGHTS, _INDEX = "model.safetensors", "model.safetensors.index.json"
_TORCH_WEIGHTS = "pytorch_model.bin"


@dataclasses.dataclass(frozen=True, eq=False)
class Reward:
    """A loaded reward model: frozen params plus pure functions over them.

    Attributes:
      name: registry name ("hpsv21", "pickscore", "clip_score", "aesthetic").
      params: everything `score` reads (vision tower, projection, logit scale or head).
      text_params: the text tower `embed_text` reads ({} for image-only rewards).
      score: pure `(params, images (B, H, W, 3) in [0, 1], text_features (B, D)) -> (B,)`
        float32, jittable and differentiable in the images. text_features may also be
        (1, D) (one prompt for the whole batch).
      embed_text: pure `(text_params, ids (B, S) int32) -> (B, D)` float32 text features.
      tokenize: prompts -> (B, S) int32 ids (host side, not jittable).
    """

    name: str
    params: Params
    text_params: Params
    score: ScoreFn
    embed_text: EmbedFn
    tokenize: Callable[[Sequence[str]], np.ndarray]

    @functools.cached_property
    def _embed_jit(self) -> EmbedFn:
        return jax.jit(self.embed_text)

    @functools.cached_property
    def _score_jit(self) -> ScoreFn:
        return jax.jit(self.score)

    def encode_text(self, prompts: Sequence[str]) -> jax.Array:
        """Prompts -> (B, D) text features for `score` (precompute them once per prompt)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self._embed_jit(self.text_params, jnp.asarray(self.tokenize(list(prompts))))

    def __call__(self, images: jax.Array, prompts: Sequence[str]) -> jax.Array:
        """(B,) rewards of `images` for `prompts` (one per image, or a single prompt);
        differentiable in `images`."""
        return self._score_jit(self.params, images, self.encode_text(prompts))


def to_device(tree: Params) -> Params:
    """Host arrays -> jax arrays on the default device (params stay float32)."""
    return jax.tree.map(jnp.asarray, tree)


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | os.PathLike, context_length: int,
                   what: str) -> Callable[[Sequence[str]], np.ndarray]:
    """A CLIP BPE tokenizer (transformers `CLIPTokenizer`) from a local folder, as a function
    prompts -> (B, context_length) int32 ids: BOS, tokens, EOS, padded to the length.

    The tokenizer's own pad token is used (OpenAI: EOS; OpenCLIP: 0). Under the causal text
    mask the pooled output does not depend on what follows the EOS token, so both give the
    same features.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: tokenizer folder not found: {path}; pass "
                                "tokenizer= a folder with vocab.json and merges.txt (or "
                                "tokenizer.json)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{what}: no vocab.json / tokenizer.json in {path}; pass "
                                "tokenizer= a CLIP tokenizer folder (e.g. the tokenizer/ of "
                                "FLUX.1 or openai/clip-vit-large-patch14)")
    from transformers import CLIPTokenizer  # runtime dependency, imported when used

    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{what}: {path} is not a loadable CLIP tokenizer "
                         f"({type(err).__name__}: {err}); re-download it") from err

    def tokenize(prompts: Sequence[str]) -> np.ndarray:
        ids = tokenizer(list(prompts), padding="max_length", max_length=context_length,
                        truncation=True, return_tensors="np")["input_ids"]
        return np.asarray(ids, np.int32)

    return tokenize


def tokenizer_folder(tokenizer: str | os.PathLike | None, model_folder: str | None,
                     what: str) -> str:
    """`tokenizer` if given, else the model folder when it holds tokenizer files."""
    if tokenizer is not None:
        return os.fspath(tokenizer)
    if model_folder and any(os.path.isfile(os.path.join(model_folder, f))
                            for f in _TOKENIZER_FILES):
        return model_folder
    raise ValueError(f"{what}: no tokenizer given and none in {model_folder or 'the checkpoint'}; "
                     "pass tokenizer= a CLIP tokenizer folder (vocab.json + merges.txt)")


# ----------------------------------------------------------------------------- CLIP scoring


def text_embedder(config: CLIPTextConfig) -> EmbedFn:
    """Pure `(text tower params, ids) -> L2-normalised projected text embeddings`."""
    model = CLIPTextModel(config)

    def embed_text(text_params: Params, ids: jax.Array) -> jax.Array:
        features = model.apply({"params": text_params}, ids, method="get_text_features")
        return l2_normalize(features)

    return embed_text


def image_embedder(config: CLIPVisionConfig,
                   crop: str) -> Callable[[Params, jax.Array], jax.Array]:
    """Pure `(vision tower params, images in [0, 1]) -> L2-normalised image embeddings`,
    preprocessing included (resize, centre crop with `crop` rounding, normalise)."""
    model = CLIPVisionModel(config)

    def embed_images(vision_params: Params, images: jax.Array) -> jax.Array:
        pixels = preprocess(images, config.image_size, crop)
        features = model.apply({"params": vision_params}, pixels.astype(config.compute_dtype),
                               method="get_image_features")
        return l2_normalize(features)

    return embed_images


def cosine_scorer(config: CLIPVisionConfig, crop: str, logit_scaled: bool) -> ScoreFn:
    """Pure `score(params, images, text_features)`: the cosine of the image and text
    embeddings, times `exp(params["logit_scale"])` when `logit_scaled` (PickScore).

    params = {"vision_model": CLIPVisionModel tree with visual_projection,
              "logit_scale": () log scale}.
    """
    embed_images = image_embedder(config, crop)

    def score(params: Params, images: jax.Array, text_features: jax.Array) -> jax.Array:
        image_features = embed_images(params["vision_model"], images)
        cosine = jnp.sum(image_features * text_features.astype(jnp.float32), axis=-1)
        if logit_scaled:
            cosine = jnp.exp(params["logit_scale"]) * cosine
        return cosine

    return score


def with_compute(config: Any, dtype: str, remat: str) -> Any:
    """`config` with the compute dtype and remat policy of the reward (params stay fp32)."""
    return dataclasses.replace(config, dtype=dtype, remat=remat)


def _clip_weights(folder: str, stack: contextlib.ExitStack) -> Tensors | TorchTensors:
    """The weights of a transformers folder: safetensors (one file or sharded), else a
    single `pytorch_model.bin` (read without torch; older uploads ship only that)."""
    try:
        return Tensors(weight_files(folder, _WEIGHTS, _INDEX), stack)
    except FileNotFoundError:
        torch_file = os.path.join(folder, _TORCH_WEIGHTS)
        if not os.path.isfile(torch_file):
            raise FileNotFoundError(f"no {_WEIGHTS}, {_INDEX} or {_TORCH_WEIGHTS} in {folder}; "
                                    "download the model's weights") from None
        return stack.enter_context(TorchTensors(torch_file))


def load_clip_folder(path: str | os.PathLike, *,
                     vision_only: bool = False) -> tuple[CLIPConfig, Params]:
    """A transformers `CLIPModel` folder as `(CLIPConfig, params)` in the tree of
    `leapalign_jax.weights.clip.load_clip` ({"text_model", "vision_model", "logit_scale"}),
    from safetensors or a `pytorch_model.bin`; `vision_only` reads the vision tower only.

    Raises FileNotFoundError / ValueError (first line naming the folder) for a missing
    folder, config or weights, another model type, or missing / mis-shaped tensors.
    """
    folder = os.fspath(path)
    config = read_clip_config(folder)  # checks the folder and model_type "clip"
    with contextlib.ExitStack() as stack:
        tensors = _clip_weights(folder, stack)
        readers = {("vision_model",) + p: r for p, r in clip_vision_readers(
            tensors, config.vision, "vision_model.", source=folder).items()}
        if not vision_only:
            readers |= {("text_model",) + p: r for p, r in clip_text_readers(
                tensors, config.text, "text_model.", source=folder).items()}
            if "logit_scale" not in tensors:
                raise ValueError(f"{folder}: no logit_scale tensor; pass a full CLIPModel "
                                 "checkpoint")
            readers[("logit_scale",)] = functools.partial(tensors.read, "logit_scale")
        return config, materialize(readers, np.float32)


def load_hf_clip_reward(name: str, path: str | os.PathLike, *,
                        tokenizer: str | os.PathLike | None, dtype: str, remat: str,
                        logit_scaled: bool) -> Reward:
    """A cosine reward over a transformers `CLIPModel` folder (PickScore, CLIP score).

    Images are preprocessed as HF's `CLIPImageProcessor` does (floor crop offsets).
    """
    config, params = load_clip_folder(path)
    folder = os.fspath(path)
    tokenize = load_tokenizer(tokenizer_folder(tokenizer, folder, name),
                              config.text.max_position_embeddings, name)
    return Reward(
        name=name,
        params=to_device({"vision_model": params["vision_model"],
                          "logit_scale": params["logit_scale"]}),
        text_params=to_device(params["text_model"]),
        score=cosine_scorer(with_compute(config.vision, dtype, remat), "floor", logit_scaled),
        embed_text=text_embedder(with_compute(config.text, dtype, "none")),
        tokenize=tokenize)
