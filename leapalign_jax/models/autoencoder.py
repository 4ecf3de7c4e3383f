"""The FLUX.1 VAE: diffusers' `AutoencoderKL` with 16 latent channels, channels-last.

Same maths as diffusers (`models/autoencoders/vae.py`, `resnet.py`, `downsampling.py`,
`upsampling.py`, `attention_processor.py`) and as BFL's `flux/modules/autoencoder.py`:

- ResNet block: GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3, plus the input
  (through a 1x1 `conv_shortcut` when the width changes). GroupNorm eps 1e-6 with the exact
  two-pass variance, in fp32.
- Encoder: conv_in, one down block per width (`layers_per_block` ResNets, then all but the
  last halve the size: pad (0, 1) bottom/right, VALID stride-2 conv3x3), mid block
  (ResNet, one-head self-attention over all positions with a GroupNorm before it and a
  residual, ResNet), GroupNorm, SiLU, conv_out to `2 * latent_channels` (mean, logvar).
- Decoder: conv_in, mid block, one up block per width in reverse (`layers_per_block + 1`
  ResNets, then all but the last double the size: nearest 2x, conv3x3), GroupNorm, SiLU,
  conv_out. It is differentiable: the reward gradient runs through it.
- `quant_conv` / `post_quant_conv` (1x1) exist only when the config says so (FLUX.1: no).

Module and parameter names follow diffusers (`decoder/up_blocks_1/resnets_0/conv1` is
`decoder.up_blocks.1.resnets.0.conv1`; `downsample`, `upsample`, `attention` and `to_out`
stand for `downsamplers.0`, `upsamplers.0`, `attentions.0` and `to_out.0`). Conv kernels are
(kh, kw, in, out) with logical names (None, None, "embed", "mlp"); the widths are small, so
rules that do not divide them simply replicate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_REMAT_POLICIES = {
    "none": None,
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep conv / matmul outputs
}
_EPS = 1e-6  # every GroupNorm in the VAE
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of an AutoencoderKL (field names as in diffusers' `vae/config.json`).

    Attributes:
      in_channels: image channels the encoder reads.
      out_channels: image channels the decoder writes.
      latent_channels: latent channels (FLUX.1: 16).
      block_out_channels: width of each resolution level, finest first; there are
        `len(block_out_channels) - 1` halvings (FLUX.1: 8x down).
      layers_per_block: ResNets per encoder level (the decoder has one more per level).
      norm_num_groups: GroupNorm groups; divides every width.
      use_quant_conv: a 1x1 conv on the encoder's moments (FLUX.1: no).
      use_post_quant_conv: a 1x1 conv on the latent before decoding (FLUX.1: no).
      mid_block_add_attention: self-attention between the two mid-block ResNets.
      scaling_factor, shift_factor: the transformer's latents are
        `(mean - shift_factor) * scaling_factor`; see `to_transformer_latents`.
      dtype: compute dtype, "float32" or "bfloat16"; params stay float32 and GroupNorm
        statistics and the attention softmax are computed in float32.
      remat: rematerialisation of each ResNet, attention and upsampling block: "none",
        "full" or "dots_saveable" (keep conv outputs, recompute norms and activations).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        # Normalise so configs read from JSON compare equal to presets.
        object.__setattr__(self, "block_out_channels",
                           tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels or min(self.block_out_channels) <= 0:
            raise ValueError(f"AutoencoderConfig: block_out_channels {self.block_out_channels} "
                             "must be a non-empty list of positive widths")
        if min(self.in_channels, self.out_channels, self.latent_channels) <= 0:
            raise ValueError("AutoencoderConfig: in_channels, out_channels and latent_channels "
                             "must be positive")
        if self.layers_per_block < 1:
            raise ValueError(f"AutoencoderConfig: layers_per_block {self.layers_per_block} "
                             "must be >= 1")
        bad = [c for c in self.block_out_channels if self.norm_num_groups <= 0
               or c % self.norm_num_groups]
        if bad:
            raise ValueError(f"AutoencoderConfig: norm_num_groups {self.norm_num_groups} does "
                             f"not divide the widths {bad}; change norm_num_groups")
        if self.dtype not in _DTYPES:
            raise ValueError(f"AutoencoderConfig: unknown dtype {self.dtype!r}; "
                             f"use one of {sorted(_DTYPES)}")
        if self.remat not in _REMAT_POLICIES:
            raise ValueError(f"AutoencoderConfig: unknown remat {self.remat!r}; "
                             f"use one of {sorted(_REMAT_POLICIES)}")

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent position along each side (FLUX.1: 8)."""
        return 2 ** (len(self.block_out_channels) - 1)


FLUX_VAE = AutoencoderConfig()


def tiny_autoencoder_config(**overrides: Any) -> AutoencoderConfig:
    """A ~44k-parameter VAE for tests (widths 8, 16; 2x down); keywords override any field."""
    fields = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                  latent_channels=4)
    fields.update(overrides)
    return AutoencoderConfig(**fields)


def to_transformer_latents(mean: jax.Array, config: AutoencoderConfig) -> jax.Array:
    """Encoder mean -> the latents the transformer sees: `(mean - shift) * scale`."""
    return (mean - config.shift_factor) * config.scaling_factor


def from_transformer_latents(z: jax.Array, config: AutoencoderConfig) -> jax.Array:
    """The transformer's latents -> the decoder's input: `z / scale + shift`."""
    return z / config.scaling_factor + config.shift_factor


# ----------------------------------------------------------------------------- layers


def _conv(features: int, kernel: int, *, dtype: Any, name: str, stride: int = 1,
          padding: Any = "SAME") -> nn.Conv:
    """A conv whose kernel (kh, kw, in, out) and bias (out,) carry logical axis names."""
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
        param_dtype=jnp.float32, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 (None, None, "embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)))


def _dense(features: int, axes: tuple[str, str], *, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(
        features, dtype=dtype, param_dtype=jnp.float32, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]))


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the last axis: exact two-pass variance in fp32, eps 1e-6."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                  (None,)), (c,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                (None,)), (c,), jnp.float32)
        xf = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, c // self.groups)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)  # spatial axes and channels in a group
        mean = jnp.mean(xf, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
        xf = ((xf - mean) * jax.lax.rsqrt(var + _EPS)).reshape(x.shape)
        return (xf * scale + bias).astype(self.dtype)


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D` without time embedding (pre-norm, output scale 1)."""

    features: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        h = nn.silu(GroupNorm(self.groups, dt, name="norm1")(x))
        h = _conv(self.features, 3, dtype=dt, name="conv1")(h)
        h = nn.silu(GroupNorm(self.groups, dt, name="norm2")(h))
        h = _conv(self.features, 3, dtype=dt, name="conv2")(h)
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, dtype=dt, name="conv_shortcut")(x)
        return x + h


class AttentionBlock(nn.Module):
    """The mid-block self-attention: GroupNorm, one head over all positions, residual."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        dt = self.dtype
        y = GroupNorm(self.groups, dt, name="group_norm")(x).reshape(b, h * w, c)
        q = _dense(c, ("embed", "heads"), dtype=dt, name="to_q")(y)
        k = _dense(c, ("embed", "heads"), dtype=dt, name="to_k")(y)
        v = _dense(c, ("embed", "heads"), dtype=dt, name="to_v")(y)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * c ** -0.5, axis=-1).astype(dt)
        out = jnp.einsum("bqk,bkc->bqc", probs, v)
        out = _dense(c, ("heads", "embed"), dtype=dt, name="to_out")(out)
        return x + out.reshape(b, h, w, c)


class Downsample(nn.Module):
    """Pad (0, 1) bottom/right, then a VALID stride-2 conv3x3 (diffusers `Downsample2D`)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, stride=2, padding="VALID", dtype=self.dtype,
                     name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then conv3x3 (diffusers `Upsample2D`)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, dtype=self.dtype, name="conv")(x)


def _maybe_remat(block: type[nn.Module], remat: str) -> type[nn.Module]:
    if remat == "none":
        return block
    return nn.remat(block, policy=_REMAT_POLICIES[remat], prevent_cse=True)


class MidBlock(nn.Module):
    """ResNet, (optional) attention, ResNet at the coarsest resolution."""

    config: AutoencoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dt = self.config, self.config.compute_dtype
        resnet = _maybe_remat(ResnetBlock, c.remat)
        x = resnet(x.shape[-1], c.norm_num_groups, dt, name="resnets_0")(x)
        if c.mid_block_add_attention:
            x = _maybe_remat(AttentionBlock, c.remat)(c.norm_num_groups, dt,
                                                      name="attention")(x)
        return resnet(x.shape[-1], c.norm_num_groups, dt, name="resnets_1")(x)


# ----------------------------------------------------------------------------- networks


class DownBlock(nn.Module):
    """`layers_per_block` ResNets to `width`, then (except at the last level) a halving."""

    config: AutoencoderConfig
    width: int
    add_downsample: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dt = self.config, self.config.compute_dtype
        resnet = _maybe_remat(ResnetBlock, c.remat)
        for j in range(c.layers_per_block):
            x = resnet(self.width, c.norm_num_groups, dt, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample(dt, name="downsample")(x)
        return x


class UpBlock(nn.Module):
    """`layers_per_block + 1` ResNets to `width`, then (except at the last level) a doubling."""

    config: AutoencoderConfig
    width: int
    add_upsample: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dt = self.config, self.config.compute_dtype
        resnet = _maybe_remat(ResnetBlock, c.remat)
        for j in range(c.layers_per_block + 1):
            x = resnet(self.width, c.norm_num_groups, dt, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = _maybe_remat(Upsample, c.remat)(dt, name="upsample")(x)
        return x


class Encoder(nn.Module):
    """Images (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels), fp32."""

    config: AutoencoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dt = self.config, self.config.compute_dtype
        x = _conv(c.block_out_channels[0], 3, dtype=dt, name="conv_in")(x.astype(dt))
        last = len(c.block_out_channels) - 1
        for i, width in enumerate(c.block_out_channels):
            x = DownBlock(c, width, i != last, name=f"down_blocks_{i}")(x)
        x = MidBlock(c, name="mid_block")(x)
        x = nn.silu(GroupNorm(c.norm_num_groups, dt, name="conv_norm_out")(x))
        x = _conv(2 * c.latent_channels, 3, dtype=dt, name="conv_out")(x)
        return x.astype(jnp.float32)


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels), fp32."""

    config: AutoencoderConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c, dt = self.config, self.config.compute_dtype
        widths = c.block_out_channels[::-1]
        x = _conv(widths[0], 3, dtype=dt, name="conv_in")(z.astype(dt))
        x = MidBlock(c, name="mid_block")(x)
        for i, width in enumerate(widths):
            x = UpBlock(c, width, i != len(widths) - 1, name=f"up_blocks_{i}")(x)
        x = nn.silu(GroupNorm(c.norm_num_groups, dt, name="conv_norm_out")(x))
        x = _conv(c.out_channels, 3, dtype=dt, name="conv_out")(x)
        return x.astype(jnp.float32)


class AutoencoderKL(nn.Module):
    """The VAE. `encode` / `decode` are the methods to apply; `__call__` (encode, then decode
    the mean) exists to initialise every parameter.

    Decoding needs only `params["decoder"]` (and `params["post_quant_conv"]` when used):
    `AutoencoderKL(config).apply({"params": params}, z, method="decode")`.
    """

    config: AutoencoderConfig

    def setup(self):
        c = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        if c.use_quant_conv:
            self.quant_conv = _conv(2 * c.latent_channels, 1, dtype=c.compute_dtype,
                                    name="quant_conv")
        if c.use_post_quant_conv:
            self.post_quant_conv = _conv(c.latent_channels, 1, dtype=c.compute_dtype,
                                         name="post_quant_conv")

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each
        (B, H/f, W/f, latent_channels) float32; logvar clamped to [-30, 20] as in diffusers."""
        moments = self.encoder(images)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments.astype(self.config.compute_dtype))
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents (B, h, w, latent_channels) (already `from_transformer_latents`) -> images
        (B, h*f, w*f, out_channels) float32, roughly in [-1, 1] (not clipped)."""
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z.astype(self.config.compute_dtype))
        return self.decoder(z)

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)


def example_images(config: AutoencoderConfig, size: int | None = None,
                   batch: int = 1) -> jax.Array:
    """Zero images for `init` / `jax.eval_shape` (default: the smallest valid size)."""
    size = size or config.downsample_factor
    return jnp.zeros((batch, size, size, config.in_channels), jnp.float32)


def abstract_params(config: AutoencoderConfig) -> Any:
    """`jax.eval_shape` of the params, leaves boxed with their logical axis names."""
    return jax.eval_shape(lambda rng: AutoencoderKL(config).init(rng, example_images(config))
                          ["params"], jax.random.key(0))


def init_params(config: AutoencoderConfig, rng: jax.Array) -> Any:
    """Plain (unboxed) randomly initialised params."""
    return jax.jit(lambda r: nn.meta.unbox(
        AutoencoderKL(config).init(r, example_images(config))["params"]))(rng)
