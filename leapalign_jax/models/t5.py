"""The T5 v1.1 encoder: FLUX.1's `text_encoder_2`, text token ids -> `prompt_embeds`.

Same maths as transformers' `T5EncoderModel` (the reference FLUX.1 pipelines call):

- token embedding (`shared`, tied with the decoder's and the LM head's in full T5);
- `num_layers` pre-norm blocks: RMS norm -> self-attention -> residual, RMS norm ->
  feed-forward -> residual;
- a final RMS norm; its output is `last_hidden_state`.

T5's peculiarities, each a classic porting bug:

- Positions enter only through a learned relative position bias: each (query, key)
  offset falls in one of `relative_attention_num_buckets` buckets (half for each
  direction; in each half, half the buckets are exact offsets and half are log-spaced up to
  `relative_attention_max_distance`), and a (buckets, heads) table turns buckets into a
  per-head logit bias. Only the first block owns the table; the bias it gives is added in
  every block.
- Attention logits are NOT scaled by 1/sqrt(d_kv) (T5's init absorbs the factor).
- The norm is RMS only (no mean, no bias), computed in fp32 with eps 1e-6; the learned
  weight multiplies the result after the cast back to the compute dtype.
- The v1.1 feed-forward is gated: `wo(gelu_new(wi_0 x) * wi_1 x)`, gelu_new being the
  tanh approximation.

FLUX.1 pads prompts to 512 tokens and calls the encoder with NO attention mask, so padding
tokens are attended and their outputs depend on the prompt; `attention_mask` defaults to
None for that reason.

Precision: parameters are float32; with `dtype="bfloat16"` the matmuls take bf16 inputs,
but the residual stream, the norms, the attention logits and softmax, and the outputs of the
attention (`o`) and feed-forward (`wo`) projections are float32 (bf16 inputs, fp32
accumulation), the analogue of transformers keeping `wo` in fp32 for half precision.

Module names mirror the transformers checkpoint closely enough that the loader
(`leapalign_jax.weights.t5`) is a table of renames plus transposes; q/k/v kernels are
flattened (d_model, heads * d_kv) like torch's Linear.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_REMAT_POLICIES = {
    "none": None,
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}
_ACTIVATIONS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # tanh approximation
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact erf
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 encoder (field names as in transformers' `T5Config`).

    Attributes:
      vocab_size: rows of the token embedding (T5 v1.1: 32128).
      d_model: model width.
      d_kv: width of one attention head (need not be d_model / num_heads).
      d_ff: feed-forward hidden width.
      num_layers: encoder blocks.
      num_heads: attention heads.
      relative_attention_num_buckets: buckets of the relative position bias.
      relative_attention_max_distance: offsets at or beyond this share the last bucket.
      layer_norm_epsilon: RMS norm epsilon.
      dense_act_fn: feed-forward activation: "gelu_new" (tanh gelu), "gelu" or "relu".
      is_gated_act: gated feed-forward `wo(act(wi_0 x) * wi_1 x)` (v1.1) rather than
        `wo(act(wi x))` (original T5).
      dtype: compute dtype, "float32" or "bfloat16"; parameters always stay float32.
      remat: rematerialisation of each block: "none", "full" or "dots_saveable".
    """

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True
    dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        sizes = dict(vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv,
                     d_ff=self.d_ff, num_heads=self.num_heads)
        for name, value in sizes.items():
            if int(value) != value or value <= 0:
                raise ValueError(f"T5Config: {name} must be a positive integer, got {value!r}")
        if int(self.num_layers) != self.num_layers or self.num_layers < 0:
            raise ValueError(f"T5Config: num_layers must be >= 0, got {self.num_layers!r}")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
            raise ValueError("T5Config: relative_attention_num_buckets must be an even number "
                             f">= 4, got {self.relative_attention_num_buckets!r}")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError(
                f"T5Config: relative_attention_max_distance {self.relative_attention_max_distance}"
                " must exceed num_buckets / 4 (the exact buckets); raise it")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"T5Config: layer_norm_epsilon must be > 0, "
                             f"got {self.layer_norm_epsilon!r}")
        if self.dense_act_fn not in _ACTIVATIONS:
            raise ValueError(f"T5Config: unknown dense_act_fn {self.dense_act_fn!r}; "
                             f"use one of {sorted(_ACTIVATIONS)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"T5Config: unknown dtype {self.dtype!r}; "
                             f"use one of {sorted(_DTYPES)}")
        if self.remat not in _REMAT_POLICIES:
            raise ValueError(f"T5Config: unknown remat {self.remat!r}; "
                             f"use one of {sorted(_REMAT_POLICIES)}")

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated attention heads."""
        return self.num_heads * self.d_kv

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]


# FLUX.1's text_encoder_2: google/t5-v1_1-xxl's encoder.
T5_XXL = T5Config()


def tiny_t5_config(**overrides: Any) -> T5Config:
    """A ~20k-parameter T5 encoder for tests; keyword arguments override any field."""
    fields = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20)
    fields.update(overrides)
    return T5Config(**fields)


# ----------------------------------------------------------------------------- helpers


def _dense(features: int, axes: tuple[str | None, str | None], *, dtype: Any, name: str,
           fp32_out: bool = False) -> nn.Dense:
    """A bias-free Dense whose kernel (in, out) carries logical axis names.

    `fp32_out` accumulates and returns float32 whatever the input dtype (bf16 x bf16 -> f32).
    """
    dot = (functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
           if fp32_out else None)
    return nn.Dense(
        features, use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name,
        dot_general=dot,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes))


def relative_position_bucket(relative_position: jax.Array, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """Bidirectional T5 bucket of each offset `key_pos - query_pos` (int array).

    Positive offsets use the upper half of the buckets. Within a half, offsets below a
    quarter of `num_buckets` get one bucket each; larger ones are log-spaced up to
    `max_distance`, beyond which they share the last bucket.
    """
    num_buckets //= 2
    buckets = jnp.where(relative_position > 0, num_buckets, 0)
    distance = jnp.abs(relative_position)
    max_exact = num_buckets // 2
    # Clamp inside the log so offset 0 gives no -inf (it takes the exact branch anyway).
    log_ratio = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
                 / math.log(max_distance / max_exact))
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype: Any) -> jax.Array:
    """T5 layer norm: x / rms(x) in fp32, cast to `dtype`, then times the weight."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return xf.astype(dtype) * weight.astype(dtype)


class T5LayerNorm(nn.Module):
    """RMS norm with a learned per-channel weight (checkpoint: `layer_norm.weight`)."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                   ("embed",)),
                            (x.shape[-1],), jnp.float32)
        return rms_norm(x, weight, self.eps, self.dtype)


class RelativePositionBias(nn.Module):
    """The (1, heads, S, S) logit bias of the first block's `relative_attention_bias` table."""

    config: T5Config

    @nn.compact
    def __call__(self, seq_len: int) -> jax.Array:
        c = self.config
        table = self.param("embedding", nn.with_logical_partitioning(
            nn.initializers.normal(c.d_model ** -0.5), (None, "heads")),
            (c.relative_attention_num_buckets, c.num_heads), jnp.float32)
        pos = jnp.arange(seq_len)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None],
                                           c.relative_attention_num_buckets,
                                           c.relative_attention_max_distance)
        return jnp.transpose(table[buckets], (2, 0, 1))[None]  # (1, heads, q, k)


class T5Attention(nn.Module):
    """Unscaled multi-head self-attention with an additive (fp32) position bias."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        c, dt = self.config, self.config.compute_dtype
        heads = lambda t: t.reshape(*t.shape[:2], c.num_heads, c.d_kv)  # noqa: E731
        q = heads(_dense(c.inner_dim, ("embed", "heads"), dtype=dt, name="q")(x))
        k = heads(_dense(c.inner_dim, ("embed", "heads"), dtype=dt, name="k")(x))
        v = heads(_dense(c.inner_dim, ("embed", "heads"), dtype=dt, name="v")(x))
        # Logits and softmax in fp32; bias carries both positions and the optional mask.
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0)
        out = out.reshape(*out.shape[:2], c.inner_dim)
        return _dense(c.d_model, ("heads", "embed"), dtype=dt, name="o", fp32_out=True)(out)


class T5FeedForward(nn.Module):
    """Gated `wo(act(wi_0 x) * wi_1 x)` (v1.1) or plain `wo(act(wi x))` feed-forward."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dt = self.config, self.config.compute_dtype
        act = _ACTIVATIONS[c.dense_act_fn]
        if c.is_gated_act:
            h = (act(_dense(c.d_ff, ("embed", "mlp"), dtype=dt, name="wi_0")(x))
                 * _dense(c.d_ff, ("embed", "mlp"), dtype=dt, name="wi_1")(x))
        else:
            h = act(_dense(c.d_ff, ("embed", "mlp"), dtype=dt, name="wi")(x))
        # fp32 accumulation and output: the projection that overflows fp16 in torch.
        return _dense(c.d_model, ("mlp", "embed"), dtype=dt, name="wo", fp32_out=True)(h)


class T5Block(nn.Module):
    """Pre-norm self-attention and feed-forward, each added to the fp32 residual stream."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        c, dt = self.config, self.config.compute_dtype
        x = x + T5Attention(c, name="attention")(
            T5LayerNorm(c.layer_norm_epsilon, dt, name="attention_norm")(x), bias)
        return x + T5FeedForward(c, name="mlp")(
            T5LayerNorm(c.layer_norm_epsilon, dt, name="mlp_norm")(x))


class T5Encoder(nn.Module):
    """T5 encoder: token ids -> `last_hidden_state` (after the final RMS norm)."""

    config: T5Config

    @nn.compact
    def __call__(self, input_ids: jax.Array,
                 attention_mask: jax.Array | None = None) -> jax.Array:
        """Encodes a batch of token ids.

        Args:
          input_ids: (B, S) int token ids.
          attention_mask: optional (B, S), 1/True for tokens to attend to, 0/False for keys to
            ignore. FLUX.1 passes none (pads are attended), hence the default.

        Returns:
          (B, S, d_model) float32 hidden states.
        """
        c = self.config
        embed = nn.Embed(c.vocab_size, c.d_model, dtype=jnp.float32, param_dtype=jnp.float32,
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(1.0), ("vocab", "embed")),
                         name="shared")
        x = embed(input_ids.astype(jnp.int32))
        bias = RelativePositionBias(c, name="relative_attention_bias")(input_ids.shape[1])
        if attention_mask is not None:
            # Same additive mask as transformers: the fp32 minimum on ignored keys.
            keep = attention_mask.astype(bool)[:, None, None, :]
            bias = bias + jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)
        block = T5Block
        if c.remat != "none":
            block = nn.remat(T5Block, policy=_REMAT_POLICIES[c.remat], prevent_cse=True)
        for i in range(c.num_layers):
            x = block(c, name=f"block_{i}")(x, bias)
        return T5LayerNorm(c.layer_norm_epsilon, jnp.float32, name="final_layer_norm")(x)


def abstract_t5_params(config: T5Config) -> Any:
    """`jax.eval_shape` of the params, leaves boxed with their logical axis names."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda rng: T5Encoder(config).init(rng, ids)["params"],
                          jax.random.key(0))


def init_t5_params(config: T5Config, rng: jax.Array) -> Any:
    """Plain (unboxed) randomly initialised params."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(lambda r: nn.meta.unbox(T5Encoder(config).init(r, ids)["params"]))(rng)
