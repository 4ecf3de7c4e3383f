"""CLIP text and vision transformers (Hugging Face `transformers` layout) in Flax linen.

FLUX.1 conditions on the pooled output of the CLIP-L text model (`text_encoder/`); the
reward models (HPSv2.1 and PickScore on ViT-H-14, CLIP score and the LAION aesthetic
predictor on ViT-L/14) reuse the same two towers with their projections.

Same maths as transformers' `CLIPTextModel`, `CLIPVisionModel(WithProjection)` and
`CLIPModel`: pre-norm encoder layers (`layer_norm1` -> attention -> residual,
`layer_norm2` -> MLP -> residual), layer-norm eps from the config (1e-5), `quick_gelu`
(OpenAI) or exact erf `gelu` (OpenCLIP ViT-H-14). Module and parameter names mirror the HF
keys (`encoder.layers.3.self_attn.q_proj.weight` is `encoder/layers_3/self_attn/q_proj/
kernel`, transposed), so the loader in `leapalign_jax.weights.clip` is a rename plus a
transpose. Every kernel carries logical axis names ("embed", "mlp", "heads", "vocab").

Parameters are float32; `dtype="bfloat16"` runs the matmuls in bf16 while layer norms and
the attention softmax stay in fp32. Outputs are float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_REMAT_POLICIES = {
    "none": None,
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}
_ACTIVATIONS = ("quick_gelu", "gelu")
# transformers keeps the pre-#24773 pooling (argmax of the ids) for configs with this id.
LEGACY_EOS_TOKEN_ID = 2


def _check_common(name: str, c: Any) -> None:
    """Validation shared by the text and vision configs; one-line ValueErrors."""
    if min(c.hidden_size, c.intermediate_size, c.num_heads) <= 0 or c.num_layers < 0:
        raise ValueError(f"{name}: hidden_size, intermediate_size and num_heads must be "
                         "positive and num_layers >= 0")
    if c.hidden_size % c.num_heads:
        raise ValueError(f"{name}: hidden_size {c.hidden_size} must be divisible by num_heads "
                         f"{c.num_heads}; change one of them")
    if c.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"{name}: unknown hidden_act {c.hidden_act!r}; use one of "
                         f"{list(_ACTIVATIONS)}")
    if c.projection_dim is not None and c.projection_dim <= 0:
        raise ValueError(f"{name}: projection_dim {c.projection_dim} must be positive or None")
    if c.dtype not in _DTYPES:
        raise ValueError(f"{name}: unknown dtype {c.dtype!r}; use one of {sorted(_DTYPES)}")
    if c.remat not in _REMAT_POLICIES:
        raise ValueError(f"{name}: unknown remat {c.remat!r}; use one of "
                         f"{sorted(_REMAT_POLICIES)}")
    if not c.layer_norm_eps > 0:
        raise ValueError(f"{name}: layer_norm_eps must be positive, got {c.layer_norm_eps}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text tower (HF `CLIPTextConfig` with shorter names).

    Attributes:
      vocab_size: token vocabulary (49408 for OpenAI / OpenCLIP BPE).
      hidden_size: width (CLIP-L 768, ViT-H-14 text 1024).
      intermediate_size: MLP hidden width.
      num_layers: encoder layers (HF `num_hidden_layers`).
      num_heads: attention heads (HF `num_attention_heads`).
      max_position_embeddings: longest sequence (77).
      hidden_act: "quick_gelu" (OpenAI) or "gelu" (exact erf, OpenCLIP ViT-H-14).
      layer_norm_eps: epsilon of every LayerNorm.
      eos_token_id: pooling picks the first position holding this id; the legacy value 2
        means "the position of the largest id" instead, as transformers does.
      projection_dim: width of `text_projection` (CLIPModel's text_embeds); None: no
        projection (FLUX's `text_encoder/` is a plain CLIPTextModel).
      dtype: compute dtype, "float32" or "bfloat16"; params stay float32.
      remat: rematerialisation of each encoder layer: "none", "full" or "dots_saveable".
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = LEGACY_EOS_TOKEN_ID
    projection_dim: int | None = None
    dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        _check_common("CLIPTextConfig", self)
        if self.vocab_size <= 0 or self.max_position_embeddings <= 0:
            raise ValueError("CLIPTextConfig: vocab_size and max_position_embeddings must be "
                             "positive")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"CLIPTextConfig: eos_token_id {self.eos_token_id} is outside the "
                             f"vocabulary (size {self.vocab_size}); set the tokenizer's EOS id")

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Architecture of a CLIP vision tower (ViT; HF `CLIPVisionConfig` with shorter names).

    Attributes:
      hidden_size: width (ViT-L/14 1024, ViT-H-14 1280).
      intermediate_size: MLP hidden width.
      num_layers: encoder layers.
      num_heads: attention heads.
      image_size: side of the (square) input image in pixels (224).
      patch_size: side of a patch (14); `image_size` must be a multiple of it.
      num_channels: input channels (3).
      hidden_act: "quick_gelu" (OpenAI ViT-L/14) or "gelu" (exact erf, ViT-H-14).
      layer_norm_eps: epsilon of every LayerNorm.
      projection_dim: width of `visual_projection` (image_embeds); None: no projection.
      dtype: compute dtype, "float32" or "bfloat16"; params stay float32.
      remat: rematerialisation of each encoder layer: "none", "full" or "dots_saveable".
    """

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None
    dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        _check_common("CLIPVisionConfig", self)
        if min(self.image_size, self.patch_size, self.num_channels) <= 0:
            raise ValueError("CLIPVisionConfig: image_size, patch_size and num_channels must be "
                             "positive")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPVisionConfig: image_size {self.image_size} must be a "
                             f"multiple of patch_size {self.patch_size}")

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A full CLIP model: both towers with projections of one width, and the logit scale.

    Attributes:
      text: text tower; its `projection_dim` is the shared embedding width.
      vision: vision tower; same `projection_dim`.
      logit_scale_init: initial value of the *log* logit scale (HF 2.6592 = log(1/0.07)).
    """

    text: CLIPTextConfig
    vision: CLIPVisionConfig
    logit_scale_init: float = 2.6592

    def __post_init__(self):
        if self.text.projection_dim is None or self.text.projection_dim != \
                self.vision.projection_dim:
            raise ValueError(f"CLIPConfig: text and vision projection_dim must be equal and set, "
                             f"got {self.text.projection_dim} and {self.vision.projection_dim}")

    @property
    def projection_dim(self) -> int:
        return self.text.projection_dim


# ----------------------------------------------------------------------------- helpers


def _dense(features: int, axes: tuple[str | None, str | None], *, dtype: Any,
           name: str | None = None, use_bias: bool = True) -> nn.Dense:
    """A Dense whose kernel (in, out) and bias (out,) carry logical axis names."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))


def _layer_norm(eps: float, dtype: Any, name: str | None = None) -> nn.LayerNorm:
    """torch-equivalent LayerNorm: statistics in fp32, exact two-pass variance."""
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))


def _embed(num: int, features: int, axes: tuple[str | None, str], dtype: Any,
           name: str) -> nn.Embed:
    return nn.Embed(num, features, dtype=dtype, param_dtype=jnp.float32, name=name,
                    embedding_init=nn.with_logical_partitioning(
                        nn.initializers.normal(0.02), axes))


def activation(x: jax.Array, name: str) -> jax.Array:
    """`quick_gelu` = x * sigmoid(1.702 x) (OpenAI CLIP) or exact erf `gelu`."""
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=False)


def pooled_index(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """(B, S) ids -> (B,) position whose hidden state is the pooled output.

    The first position holding `eos_token_id`, or the position of the largest id when
    `eos_token_id` is the legacy 2 (old configs; OpenAI's EOS 49407 is the largest id).
    Both are `argmax`es, which return the first maximum, exactly as torch's.
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


# ----------------------------------------------------------------------------- modules


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (scale head_dim**-0.5)."""

    hidden_size: int
    num_heads: int
    causal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, length, _ = x.shape

        def heads(name: str) -> jax.Array:
            out = _dense(self.hidden_size, ("embed", "heads"), dtype=self.dtype, name=name)(x)
            return out.reshape(b, length, self.num_heads, -1)

        q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
        # Logits and softmax in fp32 whatever the compute dtype.
        out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        return _dense(self.hidden_size, ("heads", "embed"), dtype=self.dtype, name="out_proj")(
            out.reshape(b, length, self.hidden_size))


class CLIPMLP(nn.Module):
    """`fc2(act(fc1(x)))`."""

    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(self.intermediate_size, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        return _dense(self.hidden_size, ("mlp", "embed"), dtype=self.dtype, name="fc2")(
            activation(x, self.hidden_act))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`."""

    config: CLIPTextConfig | CLIPVisionConfig
    causal: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dt = self.config, self.config.compute_dtype
        h = _layer_norm(c.layer_norm_eps, dt, "layer_norm1")(x)
        x = x + CLIPAttention(c.hidden_size, c.num_heads, self.causal, dt, name="self_attn")(h)
        h = _layer_norm(c.layer_norm_eps, dt, "layer_norm2")(x)
        return x + CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act, dt, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """`num_layers` encoder layers (`layers_{i}`), each rematerialised per `config.remat`."""

    config: CLIPTextConfig | CLIPVisionConfig
    causal: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layer = CLIPEncoderLayer
        if self.config.remat != "none":
            layer = nn.remat(layer, policy=_REMAT_POLICIES[self.config.remat],
                             prevent_cse=True)
        for i in range(self.config.num_layers):
            x = layer(self.config, self.causal, name=f"layers_{i}")(x)
        return x


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c, dt = self.config, self.config.compute_dtype
        tokens = _embed(c.vocab_size, c.hidden_size, ("vocab", "embed"), dt,
                        "token_embedding")(input_ids)
        positions = _embed(c.max_position_embeddings, c.hidden_size, (None, "embed"), dt,
                           "position_embedding")(jnp.arange(input_ids.shape[-1]))
        return tokens + positions


class CLIPTextModel(nn.Module):
    """CLIP text tower: causal encoder, final layer norm, EOS pooling, optional projection.

    `__call__(input_ids)` gives `(last_hidden_state, pooled)` (FLUX uses `pooled`);
    `get_text_features(input_ids)` gives the projected (unnormalised) text embedding, as
    HF's `CLIPModel.get_text_features` / `CLIPTextModelWithProjection.text_embeds`.
    """

    config: CLIPTextConfig

    def setup(self):
        c, dt = self.config, self.config.compute_dtype
        self.embeddings = CLIPTextEmbeddings(c)
        self.encoder = CLIPEncoder(c, causal=True)
        self.final_layer_norm = _layer_norm(c.layer_norm_eps, dt)
        if c.projection_dim is not None:
            self.text_projection = _dense(c.projection_dim, ("embed", None), dtype=dt,
                                          use_bias=False)

    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Text features.

        Args:
          input_ids: (B, S) int token ids, S <= max_position_embeddings, each row holding an
            EOS token (OpenAI pads with EOS, OpenCLIP with 0; the causal mask makes the pooled
            output the same for both).

        Returns:
          last_hidden_state (B, S, hidden) after the final layer norm, and pooled (B, hidden)
          = last_hidden_state at the EOS position (see `pooled_index`); both float32.
        """
        c = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"CLIPTextModel: input_ids must be (B, S) with S <= "
                             f"{c.max_position_embeddings}, got {input_ids.shape}; truncate "
                             "the prompt tokens")
        x = self.embeddings(input_ids)
        x = self.final_layer_norm(self.encoder(x))
        pooled = x[jnp.arange(x.shape[0]), pooled_index(input_ids, c.eos_token_id)]
        if c.projection_dim is not None and self.is_initializing():
            self.text_projection(pooled)  # create the projection's params in `init`
        return x.astype(jnp.float32), pooled.astype(jnp.float32)

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        """(B, S) ids -> (B, projection_dim) float32 text embedding (not normalised)."""
        if self.config.projection_dim is None:
            raise ValueError("CLIPTextModel: this config has no projection_dim; use the pooled "
                             "output of __call__")
        _, pooled = self(input_ids)
        return self.text_projection(pooled).astype(jnp.float32)


class CLIPVisionEmbeddings(nn.Module):
    """Patch conv (no bias), class token prepended, learned position embedding added."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c, dt = self.config, self.config.compute_dtype
        p = c.patch_size
        patches = nn.Conv(
            c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=dt,
            param_dtype=jnp.float32, name="patch_embedding",
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     (None, None, None, "embed")),
        )(pixel_values.astype(dt))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)  # row-major patches, as torch
        cls = self.param("class_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed",)), (c.hidden_size,), jnp.float32)
        cls = jnp.broadcast_to(cls.astype(dt), (b, 1, c.hidden_size))
        positions = _embed(c.num_positions, c.hidden_size, (None, "embed"), dt,
                           "position_embedding")(jnp.arange(c.num_positions))
        return jnp.concatenate([cls, patches], axis=1) + positions


class CLIPVisionModel(nn.Module):
    """CLIP vision tower (ViT): embeddings, `pre_layrnorm`, encoder, `post_layernorm` on the
    class token, optional `visual_projection`.

    `__call__(pixel_values)` gives `(last_hidden_state, pooled)`; `get_image_features`
    the projected (unnormalised) image embedding, as HF's `image_embeds`. Differentiable
    with respect to the pixels (rewards backpropagate through it).
    """

    config: CLIPVisionConfig

    def setup(self):
        c, dt = self.config, self.config.compute_dtype
        self.embeddings = CLIPVisionEmbeddings(c)
        self.pre_layrnorm = _layer_norm(c.layer_norm_eps, dt)  # sic, HF's name
        self.encoder = CLIPEncoder(c, causal=False)
        self.post_layernorm = _layer_norm(c.layer_norm_eps, dt)
        if c.projection_dim is not None:
            self.visual_projection = _dense(c.projection_dim, ("embed", None), dtype=dt,
                                            use_bias=False)

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image features.

        Args:
          pixel_values: (B, H, W, C) channels-last images, already resized to `image_size`
            and normalised with the CLIP mean and std.

        Returns:
          last_hidden_state (B, 1 + patches, hidden) (before `post_layernorm`, as HF) and
          pooled (B, hidden) = post_layernorm(class token); both float32.
        """
        c = self.config
        if pixel_values.shape[1:] != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(f"CLIPVisionModel: pixel_values must be (B, {c.image_size}, "
                             f"{c.image_size}, {c.num_channels}) channels-last, got "
                             f"{pixel_values.shape}; resize / transpose the images")
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        pooled = self.post_layernorm(x[:, 0])
        if c.projection_dim is not None and self.is_initializing():
            self.visual_projection(pooled)  # create the projection's params in `init`
        return x.astype(jnp.float32), pooled.astype(jnp.float32)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """(B, H, W, C) pixels -> (B, projection_dim) float32 image embedding (not normalised)."""
        if self.config.projection_dim is None:
            raise ValueError("CLIPVisionModel: this config has no projection_dim; use the "
                             "pooled output of __call__")
        _, pooled = self(pixel_values)
        return self.visual_projection(pooled).astype(jnp.float32)


class CLIPOutput(NamedTuple):
    """What `CLIPModel.__call__` returns (HF `CLIPOutput` without the tower outputs).

    text_embeds / image_embeds are L2-normalised; logits_per_text = exp(logit_scale) *
    text_embeds @ image_embeds.T; logit_scale is the stored *log* scale.
    """

    text_embeds: jax.Array  # (Bt, projection_dim)
    image_embeds: jax.Array  # (Bi, projection_dim)
    logits_per_text: jax.Array  # (Bt, Bi)
    logit_scale: jax.Array  # ()


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / ||x|| over the last axis (as HF, no epsilon)."""
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nn.Module):
    """Both towers (`text_model`, `vision_model`, each holding its projection) and
    `logit_scale` (a param stored as the log, like HF)."""

    config: CLIPConfig

    def setup(self):
        self.text_model = CLIPTextModel(self.config.text)
        self.vision_model = CLIPVisionModel(self.config.vision)
        self.logit_scale = self.param(
            "logit_scale", nn.with_logical_partitioning(
                nn.initializers.constant(self.config.logit_scale_init), ()), (), jnp.float32)

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        """Unnormalised text embeddings (B, projection_dim), as HF."""
        return self.text_model.get_text_features(input_ids)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Unnormalised image embeddings (B, projection_dim), as HF."""
        return self.vision_model.get_image_features(pixel_values)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array) -> CLIPOutput:
        text = l2_normalize(self.get_text_features(input_ids))
        image = l2_normalize(self.get_image_features(pixel_values))
        logits = jnp.exp(self.logit_scale) * text @ image.T
        return CLIPOutput(text, image, logits, self.logit_scale)


# ----------------------------------------------------------------------------- params


def _example_inputs(config: Any) -> tuple[jax.Array, ...]:
    ids = jnp.zeros((1, 1), jnp.int32)
    if isinstance(config, CLIPTextConfig):
        return (ids,)
    vision = config if isinstance(config, CLIPVisionConfig) else config.vision
    pixels = jnp.zeros((1, vision.image_size, vision.image_size, vision.num_channels))
    return (pixels,) if isinstance(config, CLIPVisionConfig) else (ids, pixels)


def module_for(config: CLIPTextConfig | CLIPVisionConfig | CLIPConfig) -> nn.Module:
    """The Flax module of a config: CLIPTextModel, CLIPVisionModel or CLIPModel."""
    if isinstance(config, CLIPTextConfig):
        return CLIPTextModel(config)
    if isinstance(config, CLIPVisionConfig):
        return CLIPVisionModel(config)
    if isinstance(config, CLIPConfig):
        return CLIPModel(config)
    raise TypeError(f"not a CLIP config: {type(config).__name__}")


def abstract_params(config: CLIPTextConfig | CLIPVisionConfig | CLIPConfig) -> Any:
    """`jax.eval_shape` of the params, leaves boxed with their logical axis names."""
    model = module_for(config)
    return jax.eval_shape(lambda rng: model.init(rng, *_example_inputs(config))["params"],
                          jax.random.key(0))


def init_params(config: CLIPTextConfig | CLIPVisionConfig | CLIPConfig, rng: jax.Array) -> Any:
    """Plain (unboxed) randomly initialised params."""
    model = module_for(config)
    return jax.jit(lambda r: nn.meta.unbox(
        model.init(r, *_example_inputs(config))["params"]))(rng)
