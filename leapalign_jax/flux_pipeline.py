"""A FLUX.1 folder (diffusers layout) as a JAX pipeline with diffusers' FluxPipeline API.

    pipe = load_flux_pipeline("path/to/FLUX.1-dev", dtype="bfloat16")
    prompt_embeds, pooled = pipe.encode_prompts(["a cat"], max_sequence_length=512)
    images = pipe.decode(packed_latents, height=720, width=720)  # (B, H, W, 3) in [0, 1]
    images = pipe.sample(["a cat"], height=720, width=720, num_steps=28, guidance=3.5, seed=0)

Each method equals its FluxPipeline counterpart (same tokenisation, schedule, timesteps and
decoding; checked in tests/test_flux_pipeline.py):

- `encode_prompts` = `FluxPipeline.encode_prompt`: T5 `last_hidden_state` of the ids padded
  to `max_sequence_length` with NO attention mask (pads are attended), and CLIP's pooled
  output of the ids padded to the CLIP tokenizer's 77.
- `decode`: unpack 2x2 tokens -> `z / scaling_factor + shift_factor` -> VAE decoder ->
  `(x / 2 + 0.5)` clipped to [0, 1], channels last.
- `sample` = `FluxPipeline(prompt, latents=..., num_inference_steps, guidance_scale,
  height, width, output_type="np")`: the schedule of `scheduler_config.json`
  (`SchedulerConfig.sigmas`, resolution shift `mu` from the packed image token count), the
  transformer called at `t = sigma * num_train_timesteps / 1000` with the distilled
  guidance for models that embed it, Euler steps `x + (sigma_next - sigma) v`.

The pieces are pure functions of (params, inputs), jittable and differentiable, for reuse
by the trainer: `encode_t5`, `encode_clip`, `velocity`, `decode_latents`, `denoise`; a
`FluxPipeline` holds the static configs, the tokenizers and `params` =
{"transformer", "t5", "clip", "vae"} (plain float32 trees), and `velocity_fn` /
`decode_fn` bind the configs into the `pipeline.VelocityFn` / `DecodeFn` signatures.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from leapalign_jax import flow, parallel
from leapalign_jax.models.autoencoder import (AutoencoderConfig, AutoencoderKL,
                                              from_transformer_latents)
from leapalign_jax.models.clip import CLIPTextConfig, CLIPTextModel
from leapalign_jax.models.flux import Flux, FluxConfig
from leapalign_jax.models.t5 import T5Config, T5Encoder
from leapalign_jax.weights import flux_folder
from leapalign_jax.weights.autoencoder import load_autoencoder, read_autoencoder_config
from leapalign_jax.weights.clip import load_clip_text
from leapalign_jax.weights.files import weight_files
from leapalign_jax.weights.flux import load_flux, read_flux_config
from leapalign_jax.weights.flux_folder import SchedulerConfig
from leapalign_jax.weights.sharded import (load_autoencoder_sharded, load_flux_sharded,
                                           load_t5_sharded)
from leapalign_jax.weights.t5 import load_t5, read_t5_config

Params = Any

# params key -> the folder components it needs (model, tokenizer)
COMPONENTS = {"transformer": ("transformer",), "t5": ("text_encoder_2", "tokenizer_2"),
              "clip": ("text_encoder", "tokenizer"), "vae": ("vae",)}
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline refuses longer T5 sequences
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline's default latent side (1024 px with an 8x VAE)

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- pure pieces


def encode_t5(config: T5Config, params: Params, ids: jax.Array) -> jax.Array:
    """(B, S) T5 ids -> (B, S, d_model) `prompt_embeds`, no attention mask (as FLUX.1)."""
    return T5Encoder(config).apply({"params": params}, ids)


def encode_clip(config: CLIPTextConfig, params: Params, ids: jax.Array) -> jax.Array:
    """(B, 77) CLIP ids -> (B, hidden) `pooled_prompt_embeds` (CLIP's pooled output)."""
    return CLIPTextModel(config).apply({"params": params}, ids)[1]


def latent_size(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """Image size -> the unpacked latent's (h, w), rounded down to even as FluxPipeline."""
    return (2 * (int(height) // (vae_scale_factor * 2)),
            2 * (int(width) // (vae_scale_factor * 2)))


def velocity(config: FluxConfig, params: Params, x: jax.Array, sigma: jax.Array,
             cond: dict[str, jax.Array], *, img_ids: Any,
             num_train_timesteps: int = 1000) -> jax.Array:
    """The transformer's velocity at noise level sigma, as FluxPipeline calls it.

    Args:
      x: (B, L, in_channels) packed latents.
      sigma: (B,) noise levels; the transformer sees `sigma * num_train_timesteps / 1000`,
        FluxPipeline's `timestep / 1000` (equal to within one float32 ulp: diffusers
        multiplies by 1000 and divides again).
      cond: batch-first conditioning {"txt": (B, S, D) prompt_embeds, "y": (B, P) pooled,
        "guidance": (B,) distilled guidance (models with guidance_embed only)}.
      img_ids: (L, 3) image token ids of the latent size (`flow.image_ids`).
    """
    b = x.shape[0]
    t = sigma.astype(jnp.float32) * (num_train_timesteps / 1000.0)
    img_ids = jnp.broadcast_to(jnp.asarray(img_ids, jnp.float32), (b,) + np.shape(img_ids))
    txt_ids = jnp.zeros((b, cond["txt"].shape[1], 3), jnp.float32)
    return Flux(config).apply({"params": params}, x, img_ids, cond["txt"], txt_ids, t,
                              cond["y"], cond.get("guidance"))


def decode_latents(config: AutoencoderConfig, params: Params, packed: jax.Array,
                   latent_hw: tuple[int, int]) -> jax.Array:
    """(B, h/2 * w/2, 4C) packed latents -> (B, h*f, w*f, 3) float32 images in [0, 1]."""
    z = flow.unpack_latents(packed.astype(jnp.float32), *latent_hw)
    x = AutoencoderKL(config).apply({"params": params}, from_transformer_latents(z, config),
                                    method="decode")
    return jnp.clip(x / 2 + 0.5, 0.0, 1.0)


def denoise(config: FluxConfig, params: Params, x0: jax.Array, sigmas: jax.Array,
            cond: dict[str, jax.Array], img_ids: jax.Array, *,
            num_train_timesteps: int = 1000) -> jax.Array:
    """The Euler ODE from noise `x0` through `sigmas` (T + 1,) to the clean packed latents
    (`velocity`'s arguments; no gradient, see `flow.euler_rollout`)."""
    def step_velocity(p: Params, x: jax.Array, s: jax.Array) -> jax.Array:
        return velocity(config, p, x, s, cond, img_ids=img_ids,
                        num_train_timesteps=num_train_timesteps)
    return flow.sample(step_velocity, params, x0, sigmas)


# ----------------------------------------------------------------------------- pipeline


@dataclasses.dataclass(frozen=True, eq=False)
class FluxPipeline:
    """A loaded FLUX.1 folder. Configs are static; `params` are plain float32 trees.

    Attributes:
      transformer, t5, clip, vae: component configs (None for components not loaded), with
        the compute dtype chosen at load time.
      scheduler: the schedule's parameters from scheduler_config.json.
      params: {"transformer", "t5", "clip", "vae"} -> param tree (loaded ones only).
      clip_tokenizer, t5_tokenizer: transformers tokenizers (None when not loaded).
      clip_max_length: CLIP tokens per prompt (the tokenizer's model_max_length, 77).
      path: the folder.
    """

    transformer: FluxConfig | None
    t5: T5Config | None
    clip: CLIPTextConfig | None
    vae: AutoencoderConfig | None
    scheduler: SchedulerConfig
    params: dict[str, Params]
    clip_tokenizer: Any = None
    t5_tokenizer: Any = None
    clip_max_length: int = 77
    path: str = ""

    def __post_init__(self):
        jitted = {
            "t5": jax.jit(functools.partial(encode_t5, self.t5)),
            "clip": jax.jit(functools.partial(encode_clip, self.clip)),
            "decode": jax.jit(functools.partial(decode_latents, self.vae),
                              static_argnames="latent_hw"),
            "denoise": jax.jit(functools.partial(
                denoise, self.transformer,
                num_train_timesteps=self.scheduler.num_train_timesteps)),
        }
        object.__setattr__(self, "_jitted", jitted)

    def _need(self, key: str, method: str) -> None:
        if key not in self.params:
            raise ValueError(f"FluxPipeline.{method} needs the {key} component; load the "
                             f"folder with components including {key!r}")

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent position (8 for FLUX.1)."""
        return self.vae.downsample_factor if self.vae is not None else 8

    # ------------------------------------------------------------------ prompts

    def tokenize(self, prompts: Sequence[str] | str, max_sequence_length: int = 512
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(T5 ids (B, max_sequence_length), CLIP ids (B, clip_max_length)), int32, padded
        and truncated as FluxPipeline does."""
        self._need("t5", "tokenize")
        self._need("clip", "tokenize")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length {max_sequence_length} must be in [1, "
                             f"{MAX_SEQUENCE_LENGTH}] (FluxPipeline's limit)")
        kwargs = dict(padding="max_length", truncation=True, return_tensors="np")
        t5 = self.t5_tokenizer(prompts, max_length=max_sequence_length, **kwargs).input_ids
        clip = self.clip_tokenizer(prompts, max_length=self.clip_max_length, **kwargs).input_ids
        for name, ids, vocab in (("T5", t5, self.t5.vocab_size),
                                 ("CLIP", clip, self.clip.vocab_size)):
            if ids.max() >= vocab:
                raise ValueError(f"the {name} tokenizer gave id {ids.max()}, beyond the text "
                                 f"encoder's vocab_size {vocab}; the folder's tokenizer and "
                                 "text encoder do not belong together")
        return t5.astype(np.int32), clip.astype(np.int32)

    def encode_prompts(self, prompts: Sequence[str] | str, max_sequence_length: int = 512
                       ) -> tuple[jax.Array, jax.Array]:
        """`FluxPipeline.encode_prompt`: (prompt_embeds (B, S, 4096), pooled (B, 768))."""
        t5_ids, clip_ids = self.tokenize(prompts, max_sequence_length)
        return self.t5_embeds(t5_ids), self.clip_pooled(clip_ids)

    def t5_embeds(self, ids: Any) -> jax.Array:
        """(B, S) T5 ids -> prompt_embeds (B, S, d_model), jitted `encode_t5`."""
        self._need("t5", "t5_embeds")
        return self._jitted["t5"](self.params["t5"], jnp.asarray(ids, jnp.int32))

    def clip_pooled(self, ids: Any) -> jax.Array:
        """(B, 77) CLIP ids -> pooled_prompt_embeds (B, hidden), jitted `encode_clip`."""
        self._need("clip", "clip_pooled")
        return self._jitted["clip"](self.params["clip"], jnp.asarray(ids, jnp.int32))

    # ------------------------------------------------------------------ latents

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """The unpacked latent's (h, w) for an image size (FluxPipeline's rounding)."""
        h, w = latent_size(height, width, self.vae_scale_factor)
        if h < 2 or w < 2:
            raise ValueError(f"image size {height}x{width} is below one 2x2 latent patch; "
                             f"use at least {2 * self.vae_scale_factor} pixels a side")
        if (h * self.vae_scale_factor, w * self.vae_scale_factor) != (height, width):
            _log.warning("height/width %dx%d are not multiples of %d; images will be %dx%d",
                         height, width, 2 * self.vae_scale_factor, h * self.vae_scale_factor,
                         w * self.vae_scale_factor)
        return h, w

    def decode(self, packed_latents: jax.Array, height: int, width: int) -> jax.Array:
        """Packed latents (B, L, 4C) -> images (B, H, W, 3) in [0, 1], as FluxPipeline's
        output_type="np"."""
        self._need("vae", "decode")
        hw = self.latent_hw(height, width)
        self._check_latents(packed_latents, hw, None)
        return self._jitted["decode"](self.params["vae"], packed_latents, latent_hw=hw)

    def _check_latents(self, latents: Any, hw: tuple[int, int], batch: int | None) -> None:
        channels = (self.transformer.in_channels if self.transformer is not None
                    else 4 * self.vae.latent_channels)
        want = (hw[0] // 2 * (hw[1] // 2), channels)
        if np.ndim(latents) != 3 or tuple(np.shape(latents)[1:]) != want or (
                batch is not None and np.shape(latents)[0] != batch):
            raise ValueError(f"latents of shape {tuple(np.shape(latents))} are not packed "
                             f"latents ({batch or 'B'}, {want[0]}, {want[1]}) for a "
                             f"{hw[0] * self.vae_scale_factor}x{hw[1] * self.vae_scale_factor}"
                             " image; pass FluxPipeline-packed latents of that size")

    # ------------------------------------------------------------------ sampling

    def condition(self, prompt_embeds: Any, pooled: Any, guidance: float = 3.5
                  ) -> dict[str, jax.Array]:
        """The batch-first `cond` of `velocity`: {"txt", "y"}, plus "guidance" (B,) for
        models with a guidance embedding."""
        cond = {"txt": jnp.asarray(prompt_embeds), "y": jnp.asarray(pooled)}
        if self.transformer.guidance_embed:
            cond["guidance"] = jnp.full((cond["txt"].shape[0],), guidance, jnp.float32)
        return cond

    def image_ids(self, height: int, width: int) -> np.ndarray:
        """(L, 3) image token ids for an image size."""
        h, w = self.latent_hw(height, width)
        return flow.image_ids(h // 2, w // 2)

    def velocity_fn(self, height: int, width: int) -> Any:
        """`(params, x, sigma, cond) -> v` at an image size, the `pipeline.VelocityFn` of
        this transformer (cond from `condition`)."""
        return functools.partial(velocity, self.transformer,
                                 img_ids=self.image_ids(height, width),
                                 num_train_timesteps=self.scheduler.num_train_timesteps)

    def decode_fn(self, height: int, width: int) -> Any:
        """`(vae_params, packed) -> images` at an image size, the `pipeline.DecodeFn`."""
        return functools.partial(decode_latents, self.vae,
                                 latent_hw=self.latent_hw(height, width))

    def sigmas(self, num_steps: int, height: int, width: int) -> np.ndarray:
        """FluxPipeline's schedule (T + 1,) for an image size."""
        h, w = self.latent_hw(height, width)
        return self.scheduler.sigmas(num_steps, (h // 2) * (w // 2))

    def sample(self, prompts: Sequence[str] | str, height: int | None = None,
               width: int | None = None, num_steps: int = 28, guidance: float = 3.5,
               seed: int = 0, latents: Any = None, max_sequence_length: int = 512
               ) -> np.ndarray:
        """Text -> images (B, H, W, 3) float32 in [0, 1], as `FluxPipeline.__call__` with
        output_type="np".

        Args:
          height, width: image size (default 1024, FluxPipeline's 128 x vae scale).
          num_steps: Euler steps (`num_inference_steps`).
          guidance: distilled guidance (`guidance_scale`), ignored by models without a
            guidance embedding (schnell).
          seed: draws the packed noise N(0, 1) when `latents` is None.
          latents: packed initial noise (B, L, 4C), as FluxPipeline's `latents`.
        """
        for key in COMPONENTS:
            self._need(key, "sample")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        height = height or DEFAULT_SAMPLE_SIZE * self.vae_scale_factor
        width = width or DEFAULT_SAMPLE_SIZE * self.vae_scale_factor
        hw = self.latent_hw(height, width)
        prompt_embeds, pooled = self.encode_prompts(prompts, max_sequence_length)
        if latents is None:
            shape = (len(prompts), (hw[0] // 2) * (hw[1] // 2), self.transformer.in_channels)
            latents = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        self._check_latents(latents, hw, len(prompts))
        cond = self.condition(prompt_embeds, pooled, guidance)
        sigmas = self.sigmas(num_steps, height, width)
        x = self._jitted["denoise"](self.params["transformer"],
                                    jnp.asarray(latents, jnp.float32), sigmas, cond,
                                    self.image_ids(height, width))
        return np.asarray(self._jitted["decode"](self.params["vae"], x, latent_hw=hw))


# ----------------------------------------------------------------------------- loading


def _check_agree(folder: str, configs: dict[str, Any]) -> None:
    """The transformer's input widths must match the encoders and the VAE."""
    flux = configs.get("transformer")
    if flux is None:
        return
    pairs = [("t5", "text_encoder_2", "context_in_dim (joint_attention_dim)", flux.context_in_dim,
              lambda c: c.d_model, "d_model"),
             ("clip", "text_encoder", "vec_in_dim (pooled_projection_dim)", flux.vec_in_dim,
              lambda c: c.hidden_size, "hidden_size"),
             ("vae", "vae", "in_channels", flux.in_channels,
              lambda c: 4 * c.latent_channels, "4 x latent_channels")]
    for key, sub, field, value, other, other_field in pairs:
        if configs.get(key) is not None and other(configs[key]) != value:
            raise ValueError(
                f"{os.path.join(folder, 'transformer', 'config.json')}: {field} is {value} but "
                f"{sub}/config.json gives {other_field} {other(configs[key])}; the components "
                "come from different models, re-download the folder")


def _files_of(where: str, single: str) -> Any:
    """Lister of a component's weight files: a single file, or a folder's (sharded) ones."""
    if os.path.isfile(where):
        return lambda: [where]
    return lambda: weight_files(where, single, single + ".index.json")


def load_flux_pipeline(path: str | os.PathLike, dtype: str = "float32", *,
                       components: Sequence[str] = tuple(COMPONENTS),
                       param_dtype: Any = np.float32,
                       transformer_path: str | os.PathLike | None = None,
                       vae_path: str | os.PathLike | None = None,
                       mesh: Mesh | None = None,
                       rules: Sequence[tuple[str, Any]] = parallel.DEFAULT_RULES,
                       scan_blocks: bool = False) -> FluxPipeline:
    """Loads a FLUX.1 folder in diffusers layout as a `FluxPipeline`.

    Everything cheap is checked before any weight is read (model_index.json, every
    component's presence, the scheduler config, the tokenizers, the configs' agreement);
    then the components load one tensor at a time.

    Args:
      path: the pipeline folder (model_index.json, transformer/, text_encoder/,
        text_encoder_2/, vae/, tokenizer/, tokenizer_2/, scheduler/).
      dtype: compute dtype of every network, "float32" or "bfloat16".
      components: which of "transformer", "t5", "clip", "vae" to load (e.g. without "t5"
        when prompt embeddings are precomputed); the others need not exist.
      param_dtype: numpy dtype of the loaded params (float32; ml_dtypes.bfloat16 halves
        host memory).
      transformer_path: another transformer checkpoint (diffusers folder or BFL file, e.g.
        a fine-tuned flux1-dev.safetensors) instead of `path/transformer`.
      vae_path: another VAE (diffusers folder or BFL's ae.safetensors) instead of
        `path/vae`; a folder without vae/ but with BFL's ae.safetensors uses that file.
      mesh: load the transformer, T5 and VAE straight onto their device shards
        (`weights.sharded`, logical axes mapped by `rules`), tensor by tensor, instead of
        into host memory; CLIP (small) is loaded whole.
      scan_blocks: load the transformer in the stacked `scan_blocks` layout (one
        `nn.scan` per block kind: XLA compiles one block of each kind, not 19 + 38).

    Raises:
      FileNotFoundError: the folder, model_index.json, a component or a weight file is
        missing (the message names the file and how to get it).
      ValueError: another model family, mismatched components, or tensors that are
        missing or mis-shaped (the first line names the file, the key and the fix).
    """
    folder = os.fspath(path)
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown or not components:
        raise ValueError(f"components {list(components)}: choose from {list(COMPONENTS)}")
    ae_file = os.path.join(folder, "ae.safetensors")
    if vae_path is None and "vae" in components and not os.path.isdir(
            os.path.join(folder, "vae")) and os.path.isfile(ae_file):
        vae_path = ae_file
    where = {"transformer": os.fspath(transformer_path or os.path.join(folder, "transformer")),
             "t5": os.path.join(folder, "text_encoder_2"),
             "clip": os.path.join(folder, "text_encoder"),
             "vae": os.fspath(vae_path or os.path.join(folder, "vae"))}
    needed = ["scheduler"] + [sub for key in components for sub in COMPONENTS[key]]
    needed = [k for k in needed if not ((k == "transformer" and transformer_path)
                                        or (k == "vae" and vae_path))]
    flux_folder.check_model_index(folder, tuple(needed))
    for key in needed:
        flux_folder.component_dir(folder, key)
    scheduler = flux_folder.read_scheduler_config(folder)
    clip_tok, t5_tok = flux_folder.load_tokenizers(folder, clip="clip" in components,
                                                   t5="t5" in components)

    # Configs first (headers and config.json only), so mismatches fail before any weights.
    readers = {"transformer": read_flux_config, "t5": read_t5_config,
               "vae": read_autoencoder_config}
    configs = {k: readers[k](where[k]) for k in components if k in readers}
    _check_agree(folder, configs)

    loaders = {  # key -> (folder component, loader, single weight file name)
        "clip": ("text_encoder", load_clip_text, "model.safetensors"),
        "vae": ("vae", load_autoencoder, "diffusion_pytorch_model.safetensors"),
        "t5": ("text_encoder_2", load_t5, "model.safetensors"),
        "transformer": ("transformer", functools.partial(load_flux, scan_blocks=scan_blocks),
                        "diffusion_pytorch_model.safetensors"),
    }
    if mesh is not None:
        sharded = {"vae": load_autoencoder_sharded, "t5": load_t5_sharded,
                   "transformer": functools.partial(load_flux_sharded,
                                                    scan_blocks=scan_blocks)}
        loaders = {k: (sub, functools.partial(sharded[k], mesh=mesh, rules=rules)
                       if k in sharded else loader, single)
                   for k, (sub, loader, single) in loaders.items()}
    params: dict[str, Params] = {}
    for key, (sub, loader, single) in loaders.items():  # smallest first
        if key not in components:
            continue
        configs[key], params[key] = flux_folder.load_component(
            sub, functools.partial(loader, where[key], dtype=param_dtype),
            _files_of(where[key], single))
        _check_agree(folder, configs)
    configs = {k: dataclasses.replace(c, dtype=dtype) for k, c in configs.items()}
    clip_max = 77
    if clip_tok is not None:
        clip_max = min(int(clip_tok.model_max_length), configs["clip"].max_position_embeddings)
    return FluxPipeline(transformer=configs.get("transformer"), t5=configs.get("t5"),
                        clip=configs.get("clip"), vae=configs.get("vae"), scheduler=scheduler,
                        params=params, clip_tokenizer=clip_tok, t5_tokenizer=t5_tok,
                        clip_max_length=clip_max, path=folder)
