"""The Flux MMDiT: the rectified-flow velocity network `v_theta(x_t, t, c)` of FLUX.1.

Same maths as the reference (Black Forest Labs' `flux` and diffusers'
`FluxTransformer2DModel`): a sinusoidal embedding of `1000 * t` (and of the distilled
guidance) plus the pooled text vector make the conditioning vector `vec`; `depth`
double-stream blocks keep image and text tokens in separate weights but attend jointly over
`[txt, img]`; `depth_single_blocks` single-stream blocks run fused attention + MLP over the
concatenated sequence; an adaLN final layer maps image tokens back to latent channels.
Positions enter only through a 3-axis rotary embedding of the token ids.

Module and parameter names follow the BFL checkpoint layout (`double_blocks_3/img_attn/qkv`
is `double_blocks.3.img_attn.qkv`), so the weight loader is a rename, a transpose and a
reshape. Kernels are laid out for tensor parallelism by head and by MLP column:

- qkv projections: (embed, 3, heads, head_dim), axes ("embed", None, "heads", "kv");
- attention outputs: (heads, head_dim, embed), axes ("heads", "kv", "embed");
- MLP: (embed, mlp) then (mlp, embed);
- the single block's fused `linear1` is stored as its two parts `linear1/qkv` and
  `linear1/mlp`, and `linear2` as `linear2/attn` (no bias) and `linear2/mlp` (BFL's bias).

A "tensor" split of "heads" / "mlp" therefore gives every device whole heads (its q, k and
v) and whole MLP columns, and attention and the MLP need no communication until the
row-parallel output projection. Activations carry sharding constraints at block boundaries
(batch over the data-parallel axes, tokens and width unsplit; heads / MLP columns over
"tensor" inside a block); they apply only when traced under logical-axis rules and a mesh:

    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        out = jax.jit(Flux(config).apply)(...)

and are no-ops otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from leapalign_jax import parallel

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_REMAT_POLICIES = {
    "none": None,
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    # Keep the weight matmuls' outputs (q/k/v, projections, MLP) in host memory and copy
    # them back for the backward pass; everything else is recomputed. Needs a backend with
    # a "pinned_host" memory (TPU, GPU, and XLA:CPU).
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}
_EPS = 1e-6  # every LayerNorm / RMSNorm in Flux


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Architecture of a Flux transformer (field names as in BFL's `FluxParams`).

    Attributes:
      in_channels: channels of a packed latent token (16 VAE channels x 2 x 2 patch = 64).
      out_channels: channels of the predicted velocity; None means `in_channels`.
      vec_in_dim: width of the pooled text vector `y` (CLIP-L: 768).
      context_in_dim: width of the text tokens `txt` (T5-XXL: 4096).
      hidden_size: model width.
      mlp_ratio: MLP hidden width / model width.
      num_heads: attention heads; head dim is `hidden_size // num_heads`.
      depth: number of double-stream blocks.
      depth_single_blocks: number of single-stream blocks.
      axes_dim: rotary dims per id axis (time, row, column); they sum to the head dim.
      theta: rotary base frequency.
      qkv_bias: whether the qkv projections have a bias.
      guidance_embed: whether the model takes a distilled-guidance input (FLUX.1-dev).
      dtype: compute dtype, "float32" or "bfloat16"; parameters always stay float32.
      remat: rematerialisation of each block: "none", "full", "dots_saveable" (keep
        matmul outputs) or "offload" (keep the weight matmuls' outputs in host memory).
      scan_blocks: run each stack of identical blocks as one `nn.scan`, so XLA compiles
        one double and one single block instead of 19 + 38 (minutes instead of hours for
        FLUX.1-dev's train step on CPU). The params are then stacked per kind,
        `double_blocks/block/...` and `single_blocks/block/...` with a leading "layers"
        axis (`stack_blocks` / `unstack_blocks` convert). The sharded loader streams
        straight into this layout, LoRA stacks its adapters the same way, and exports
        unstack to the per-block files.
    """

    in_channels: int = 64
    out_channels: int | None = None
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = True
    dtype: str = "float32"
    remat: str = "none"
    scan_blocks: bool = False

    def __post_init__(self):
        # Normalise so configs read from JSON / ml_collections compare equal to presets.
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.num_heads <= 0 or self.hidden_size % self.num_heads:
            raise ValueError(f"FluxConfig: hidden_size {self.hidden_size} must be divisible by "
                             f"num_heads {self.num_heads}; change one of them")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.axes_dim) != head_dim or any(a <= 0 or a % 2 for a in self.axes_dim):
            raise ValueError(f"FluxConfig: axes_dim {self.axes_dim} must be positive even numbers "
                             f"summing to the head dim {head_dim}; fix axes_dim")
        if self.dtype not in _DTYPES:
            raise ValueError(f"FluxConfig: unknown dtype {self.dtype!r}; "
                             f"use one of {sorted(_DTYPES)}")
        if self.remat not in _REMAT_POLICIES:
            raise ValueError(f"FluxConfig: unknown remat {self.remat!r}; "
                             f"use one of {sorted(_REMAT_POLICIES)}")
        if min(self.in_channels, self.vec_in_dim, self.context_in_dim, self.out_channels) <= 0:
            raise ValueError("FluxConfig: channel widths must be positive; fix in_channels, "
                             "out_channels, vec_in_dim or context_in_dim")
        if self.depth < 0 or self.depth_single_blocks < 0:
            raise ValueError("FluxConfig: depth and depth_single_blocks must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]


FLUX_DEV = FluxConfig()
FLUX_SCHNELL = FluxConfig(guidance_embed=False)


def tiny_config(**overrides: Any) -> FluxConfig:
    """A ~78k-parameter Flux for tests (head dim 16); keyword arguments override any field."""
    fields = dict(in_channels=16, vec_in_dim=16, context_in_dim=32, hidden_size=32,
                  num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6))
    fields.update(overrides)
    return FluxConfig(**fields)


# ----------------------------------------------------------------------------- helpers


def _dense(features: int, axes: tuple[str | None, str | None], *, dtype: Any,
           name: str | None = None, use_bias: bool = True) -> "DenseGeneral":
    """A Dense (kernel (in, out), bias (out,)) with logical axis names and LoRA support."""
    return DenseGeneral((features,), axes, 1, use_bias, dtype, name=name)


def _flat_lecun_normal(in_dims: int) -> Any:
    """lecun_normal of the kernel flattened to (prod(in), prod(out)), reshaped back: the
    same values as a Dense of the flat kernel (fan-in = the whole input width)."""
    def init(rng: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        flat = (math.prod(shape[:in_dims]), math.prod(shape[in_dims:]))
        return nn.initializers.lecun_normal()(rng, flat, dtype).reshape(shape)
    return init


class DenseGeneral(nn.Module):
    """`y = x @ W + b` contracting the last `in_dims` dims of x with a kernel (in..., out...).

    When the params hold `lora_a` (in..., r) and `lora_b` (r, out...) beside the kernel
    (`models.lora.attach`), it computes `x @ W + (x @ A) @ B + b`.

    Unlike `nn.DenseGeneral`, the kernel is created in its own shape (flax's version boxes
    a flattened kernel with the full-rank names, which fails under a mesh).

    Attributes:
      features: output dims.
      axes: logical names of the kernel (in... then out...); the bias takes the out ones.
      in_dims: how many trailing input dims are contracted.
      use_bias: whether to add a bias (out...).
      dtype: compute dtype; params stay float32.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    in_dims: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = self.in_dims
        kernel = self.param("kernel", nn.with_logical_partitioning(_flat_lecun_normal(n),
                                                                    self.axes),
                            tuple(x.shape[-n:]) + tuple(self.features), jnp.float32)
        contract = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), contract)
        if self.has_variable("params", "lora_a"):
            # Adapters attached by `lora.attach` (B pre-scaled by alpha / r): the low-rank
            # path x @ A @ B, so a frozen kernel never gets a full-size gradient.
            a = self.get_variable("params", "lora_a").astype(self.dtype)
            b = self.get_variable("params", "lora_b").astype(self.dtype)
            y = y + jnp.tensordot(jax.lax.dot_general(x.astype(self.dtype), a, contract), b,
                                  axes=1)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), self.axes[n:]), tuple(self.features), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def _dense_general(features: int | tuple[int, ...], axes: tuple[str | None, ...], *,
                   dtype: Any, name: str | None = None, in_dims: int = 1,
                   use_bias: bool = True) -> DenseGeneral:
    """A `DenseGeneral` with kernel (in..., out...) named `axes`, as `_dense` for Dense."""
    features = features if isinstance(features, tuple) else (features,)
    return DenseGeneral(features, axes, in_dims, use_bias, dtype, name=name)


def kernel_in_dims(path: Sequence[str]) -> int:
    """How many leading dims of the kernel at `path` (e.g. ("double_blocks_0", "img_attn",
    "proj", "kernel")) its input contracts: 2, (heads, head_dim), for the attention output
    projections, 1 for every other kernel. Loaders and LoRA flatten kernels with it."""
    return 2 if tuple(path[-2:]) in (("proj", "kernel"), ("attn", "kernel")) else 1


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """`nn.with_logical_constraint` with mesh axes that do not divide a dim dropped.

    A no-op unless traced under `nn.logical_axis_rules` and a mesh (`jax.set_mesh`).
    Dropping non-dividing axes (as `parallel.logical_shardings` does for params) lets a
    batch of 1 or a tiny test model run on any mesh.
    """
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    spec = parallel._fit(nn.logical_to_mesh_axes(names, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


# Activation layouts: residual streams, per-head tensors and MLP hidden activations.
_TOKENS = ("batch", "length", "act_embed")
_HEADS = ("batch", "length", "heads", "kv")
_MLP = ("batch", "length", "mlp")
# Kernel layouts split by whole heads: qkv (embed, 3, heads, head_dim), output projection
# (heads, head_dim, embed).
_QKV_AXES = ("embed", None, "heads", "kv")
_OUT_AXES = ("heads", "kv", "embed")


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> jax.Array:
    """Sinusoidal embedding of `time_factor * t`, cosines first (BFL / diffusers flipped)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (time_factor * t.astype(jnp.float32))[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope(pos: jax.Array, dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Rotary angles of one id axis: cos and sin, each (..., dim // 2)."""
    omega = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = pos.astype(jnp.float32)[..., None] * omega
    return jnp.cos(angles), jnp.sin(angles)


def embed_nd(ids: jax.Array, axes_dim: Sequence[int], theta: float) -> tuple[jax.Array, jax.Array]:
    """EmbedND: 3-axis RoPE of ids (B, L, n_axes) -> cos, sin of shape (B, L, 1, head_dim // 2).

    Axis i owns `axes_dim[i] // 2` consecutive rotation pairs of every head.
    """
    parts = [rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)]
    cos = jnp.concatenate([c for c, _ in parts], axis=-1)
    sin = jnp.concatenate([s for _, s in parts], axis=-1)
    return cos[:, :, None], sin[:, :, None]


def apply_rope(x: jax.Array, pe: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates interleaved pairs (x[2i], x[2i+1]) of x (B, L, H, D) by the angles of pe."""
    cos, sin = pe
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              pe: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary multi-head attention over (B, L, H, D) -> (B, L, H, D); softmax in fp32."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    return constrain(jax.nn.dot_product_attention(q, k, v), _HEADS)


def layer_norm(x: jax.Array) -> jax.Array:
    """Affine-free LayerNorm (eps 1e-6), computed in fp32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + _EPS)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: `(1 + scale) * LayerNorm(x) + shift`."""
    return (1 + scale) * layer_norm(x) + shift


# ----------------------------------------------------------------------------- modules


class MLPEmbedder(nn.Module):
    """`out_layer(silu(in_layer(x)))`: embeds timesteps, guidance and the pooled text."""

    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(self.hidden_size, (None, "embed"), dtype=self.dtype, name="in_layer")(x)
        return _dense(self.hidden_size, ("mlp", "embed"), dtype=self.dtype,
                      name="out_layer")(nn.silu(x))


class RMSNorm(nn.Module):
    """RMSNorm over the head dim with a learned scale, in fp32."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                  (None,)),
                           (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + _EPS)
        return (xf * scale).astype(x.dtype)


class QKNorm(nn.Module):
    """Separate RMSNorms on queries and keys (stabilises attention logits)."""

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        return RMSNorm(name="query_norm")(q), RMSNorm(name="key_norm")(k)


class Modulation(nn.Module):
    """adaLN-Zero parameters from `vec`: (shift, scale, gate), twice for a double block."""

    hidden_size: int
    double: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, vec: jax.Array) -> list[jax.Array]:
        mult = 6 if self.double else 3
        out = _dense(mult * self.hidden_size, ("embed", "mlp"), dtype=self.dtype,
                     name="lin")(nn.silu(vec))
        # The chunks cut across a "tensor" split of the output: gather this small (B, 6h)
        # activation here rather than let XLA gather the kernel.
        out = constrain(out, ("batch", "act_embed"))
        return jnp.split(out[:, None, :], mult, axis=-1)


class SelfAttention(nn.Module):
    """One stream's attention weights: qkv (embed, 3, heads, head_dim), QK RMSNorm, output
    projection (heads, head_dim, embed).

    In a double-stream block the two streams attend jointly, so the block calls
    `qkv_heads` and `project` separately around one shared attention.
    """

    hidden_size: int
    num_heads: int
    qkv_bias: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        head_dim = self.hidden_size // self.num_heads
        self.qkv = _dense_general((3, self.num_heads, head_dim), _QKV_AXES, dtype=self.dtype,
                                  use_bias=self.qkv_bias)
        self.norm = QKNorm()
        self.proj = _dense_general(self.hidden_size, _OUT_AXES, dtype=self.dtype, in_dims=2)

    def qkv_heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (B, L, hidden) -> normalised q, k and v, each (B, L, heads, head_dim)."""
        return _split_qkv(self.qkv(x), self.norm)

    def project(self, x: jax.Array) -> jax.Array:
        """Attention output (B, L, heads, head_dim) -> (B, L, hidden)."""
        return constrain(self.proj(x), _TOKENS)


def _split_qkv(qkv: jax.Array, norm: nn.Module) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, L, 3, heads, head_dim) -> q, k (RMS-normalised) and v, heads split over "tensor"."""
    q, k, v = (constrain(qkv[:, :, i], _HEADS) for i in range(3))
    q, k = norm(q, k)
    return q, k, v


class DoubleStreamBlock(nn.Module):
    """MMDiT block: image and text streams with their own weights, joint attention."""

    config: FluxConfig

    @nn.compact
    def __call__(self, img: jax.Array, txt: jax.Array, vec: jax.Array,
                 pe: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        c, dt = self.config, self.config.compute_dtype
        img, txt = constrain(img, _TOKENS), constrain(txt, _TOKENS)
        img_mod1_shift, img_mod1_scale, img_mod1_gate, img_mod2_shift, img_mod2_scale, \
            img_mod2_gate = Modulation(c.hidden_size, True, dt, name="img_mod")(vec)
        txt_mod1_shift, txt_mod1_scale, txt_mod1_gate, txt_mod2_shift, txt_mod2_scale, \
            txt_mod2_gate = Modulation(c.hidden_size, True, dt, name="txt_mod")(vec)
        img_attn = SelfAttention(c.hidden_size, c.num_heads, c.qkv_bias, dt, name="img_attn")
        txt_attn = SelfAttention(c.hidden_size, c.num_heads, c.qkv_bias, dt, name="txt_attn")

        img_q, img_k, img_v = img_attn.qkv_heads(modulate(img, img_mod1_shift, img_mod1_scale))
        txt_q, txt_k, txt_v = txt_attn.qkv_heads(modulate(txt, txt_mod1_shift, txt_mod1_scale))
        # Joint attention over [txt, img], the order the ids (and hence pe) use.
        attn = attention(jnp.concatenate([txt_q, img_q], axis=1),
                         jnp.concatenate([txt_k, img_k], axis=1),
                         jnp.concatenate([txt_v, img_v], axis=1), pe)
        txt_out, img_out = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]

        def gelu_mlp(x: jax.Array, prefix: str) -> jax.Array:
            # BFL's nn.Sequential(Linear, GELU(tanh), Linear): params `{prefix}.0`, `{prefix}.2`.
            x = _dense(c.mlp_hidden_dim, ("embed", "mlp"), dtype=dt, name=f"{prefix}_0")(x)
            x = constrain(nn.gelu(x, approximate=True), _MLP)
            return constrain(_dense(c.hidden_size, ("mlp", "embed"), dtype=dt,
                                    name=f"{prefix}_2")(x), _TOKENS)

        img = img + img_mod1_gate * img_attn.project(img_out)
        img = img + img_mod2_gate * gelu_mlp(modulate(img, img_mod2_shift, img_mod2_scale),
                                             "img_mlp")
        txt = txt + txt_mod1_gate * txt_attn.project(txt_out)
        txt = txt + txt_mod2_gate * gelu_mlp(modulate(txt, txt_mod2_shift, txt_mod2_scale),
                                             "txt_mlp")
        return constrain(img, _TOKENS), constrain(txt, _TOKENS)


class SingleInput(nn.Module):
    """BFL's fused `linear1` as its two parts: `qkv` (embed, 3, heads, head_dim) and `mlp`."""

    config: FluxConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        c, dt = self.config, self.config.compute_dtype
        # Always biased, as in BFL (`qkv_bias` is the double blocks' knob).
        qkv = _dense_general((3, c.num_heads, c.head_dim), _QKV_AXES, dtype=dt, name="qkv")(x)
        mlp = _dense(c.mlp_hidden_dim, ("embed", "mlp"), dtype=dt, name="mlp")(x)
        return qkv, mlp


class SingleOutput(nn.Module):
    """BFL's fused `linear2` as its row blocks: `attn` (heads, head_dim, embed), no bias,
    plus `mlp` (mlp, embed), which holds `linear2`'s bias."""

    config: FluxConfig

    @nn.compact
    def __call__(self, attn: jax.Array, mlp: jax.Array) -> jax.Array:
        c, dt = self.config, self.config.compute_dtype
        out = _dense_general(c.hidden_size, _OUT_AXES, dtype=dt, in_dims=2, use_bias=False,
                             name="attn")(attn)
        return out + _dense(c.hidden_size, ("mlp", "embed"), dtype=dt, name="mlp")(mlp)


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence (BFL's fused linear1 / linear2)."""

    config: FluxConfig

    @nn.compact
    def __call__(self, x: jax.Array, vec: jax.Array,
                 pe: tuple[jax.Array, jax.Array]) -> jax.Array:
        c, dt = self.config, self.config.compute_dtype
        x = constrain(x, _TOKENS)
        shift, scale, gate = Modulation(c.hidden_size, False, dt, name="modulation")(vec)
        qkv, mlp = SingleInput(c, name="linear1")(modulate(x, shift, scale))
        q, k, v = _split_qkv(qkv, QKNorm(name="norm"))
        out = SingleOutput(c, name="linear2")(
            attention(q, k, v, pe), constrain(nn.gelu(mlp, approximate=True), _MLP))
        return constrain(x + gate * constrain(out, _TOKENS), _TOKENS)


class LastLayer(nn.Module):
    """Final adaLN (BFL order: shift then scale) and projection to latent channels."""

    config: FluxConfig

    @nn.compact
    def __call__(self, x: jax.Array, vec: jax.Array) -> jax.Array:
        c, dt = self.config, self.config.compute_dtype
        mod = _dense(2 * c.hidden_size, ("embed", "mlp"), dtype=dt,
                     name="adaLN_modulation_1")(nn.silu(vec))
        shift, scale = jnp.split(mod[:, None, :], 2, axis=-1)
        return _dense(c.out_channels, ("embed", None), dtype=dt, name="linear")(
            modulate(x, shift, scale))


def _maybe_remat(block: type[nn.Module], remat: str) -> type[nn.Module]:
    if remat == "none":
        return block
    return nn.remat(block, policy=_REMAT_POLICIES[remat], prevent_cse=True)


class _ScannedDouble(nn.Module):
    """One double block in `nn.scan`'s (carry, broadcast...) -> (carry, None) form."""

    config: FluxConfig

    @nn.compact
    def __call__(self, carry, vec, pe):
        block = _maybe_remat(DoubleStreamBlock, self.config.remat)(self.config, name="block")
        return block(*carry, vec, pe), None


class _ScannedSingle(nn.Module):
    """One single block in `nn.scan`'s form."""

    config: FluxConfig

    @nn.compact
    def __call__(self, x, vec, pe):
        block = _maybe_remat(SingleStreamBlock, self.config.remat)(self.config, name="block")
        return block(x, vec, pe), None


def _scan(module: type[nn.Module], length: int) -> type[nn.Module]:
    return nn.scan(module, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast, nn.broadcast), length=length,
                   metadata_params={nn.PARTITION_NAME: "layers"})


_BLOCK = re.compile(r"(double_blocks|single_blocks)_(\d+)")
STACKS = ("double_blocks", "single_blocks")


def stacked_path(path: Sequence[str]) -> tuple[tuple[str, ...], int] | None:
    """A per-block leaf path ("double_blocks_3", "img_attn", ...) -> its `scan_blocks`
    path ("double_blocks", "block", "img_attn", ...) and layer 3; None outside the blocks."""
    m = _BLOCK.fullmatch(path[0]) if path else None
    return None if m is None else ((m[1], "block") + tuple(path[1:]), int(m[2]))


def is_stacked(path: Sequence[str]) -> bool:
    """Whether `path` lies in a `scan_blocks` stack (its leaves have a leading layer axis)."""
    return len(path) > 1 and path[0] in STACKS and path[1] == "block"


def stack_blocks(params: Any, config: FluxConfig) -> Any:
    """Per-block params (`double_blocks_<i>`, `single_blocks_<i>`) -> the `scan_blocks`
    layout (`double_blocks/block/...` stacked on a leading axis)."""
    out = {k: v for k, v in params.items() if stacked_path((k,)) is None}
    for kind, n in (("double_blocks", config.depth), ("single_blocks",
                                                      config.depth_single_blocks)):
        if n:
            blocks = [params[f"{kind}_{i}"] for i in range(n)]
            out[kind] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return out


def layer_names(module: Sequence[str], layers: int) -> list[str]:
    """The per-block module names ("double_blocks_<i>/img_attn/qkv") of a stacked module
    path (`layers` of them), or the one name of a per-block path."""
    if not is_stacked(module):
        return ["/".join(module)]
    rest = "/".join(module[2:])
    return [f"{module[0]}_{i}/{rest}".rstrip("/") for i in range(layers)]


def unstack_blocks(params: Any, config: FluxConfig) -> Any:
    """The inverse of `stack_blocks`."""
    out = {k: v for k, v in params.items() if k not in STACKS}
    for kind, n in (("double_blocks", config.depth), ("single_blocks",
                                                      config.depth_single_blocks)):
        for i in range(n):
            out[f"{kind}_{i}"] = jax.tree.map(lambda x: x[i], params[kind]["block"])
    return out


class Flux(nn.Module):
    """The Flux transformer: packed latent tokens + text -> velocity `v_theta(x_t, t, c)`."""

    config: FluxConfig

    @nn.compact
    def __call__(self, img: jax.Array, img_ids: jax.Array, txt: jax.Array, txt_ids: jax.Array,
                 timesteps: jax.Array, y: jax.Array,
                 guidance: jax.Array | None = None) -> jax.Array:
        """Velocity for a batch.

        Args:
          img: (B, L, in_channels) packed latent tokens `x_t`.
          img_ids: (B, L, 3) image token ids (0, row, col).
          txt: (B, S, context_in_dim) text tokens (T5).
          txt_ids: (B, S, 3) text token ids (zeros in FLUX.1).
          timesteps: (B,) flow time `t` in [0, 1] (1 = pure noise).
          y: (B, vec_in_dim) pooled text vector (CLIP).
          guidance: (B,) distilled guidance scale; required iff `config.guidance_embed`.

        Returns:
          (B, L, out_channels) float32 velocity.
        """
        c, dt = self.config, self.config.compute_dtype
        if c.guidance_embed and guidance is None:
            raise ValueError("Flux: this model has guidance_embed=True; pass guidance (B,)")
        if not c.guidance_embed and guidance is not None:
            raise ValueError("Flux: this model has no guidance embedding; pass guidance=None")

        img = constrain(_dense(c.hidden_size, (None, "embed"), dtype=dt, name="img_in")(img),
                        _TOKENS)
        vec = MLPEmbedder(c.hidden_size, dt, name="time_in")(timestep_embedding(timesteps))
        if c.guidance_embed:
            vec = vec + MLPEmbedder(c.hidden_size, dt, name="guidance_in")(
                timestep_embedding(guidance))
        vec = vec + MLPEmbedder(c.hidden_size, dt, name="vector_in")(y)
        txt = constrain(_dense(c.hidden_size, (None, "embed"), dtype=dt, name="txt_in")(txt),
                        _TOKENS)

        pe = embed_nd(jnp.concatenate([txt_ids, img_ids], axis=1), c.axes_dim, c.theta)

        if c.scan_blocks and c.depth:
            (img, txt), _ = _scan(_ScannedDouble, c.depth)(c, name="double_blocks")(
                (img, txt), vec, pe)
        elif not c.scan_blocks:
            double = _maybe_remat(DoubleStreamBlock, c.remat)
            for i in range(c.depth):
                img, txt = double(c, name=f"double_blocks_{i}")(img, txt, vec, pe)

        x = jnp.concatenate([txt, img], axis=1)
        if c.scan_blocks and c.depth_single_blocks:
            x, _ = _scan(_ScannedSingle, c.depth_single_blocks)(c, name="single_blocks")(
                x, vec, pe)
        elif not c.scan_blocks:
            single = _maybe_remat(SingleStreamBlock, c.remat)
            for i in range(c.depth_single_blocks):
                x = single(c, name=f"single_blocks_{i}")(x, vec, pe)
        img = x[:, txt.shape[1]:]

        out = LastLayer(c, name="final_layer")(img, vec).astype(jnp.float32)
        return constrain(out, ("batch", "length", None))


def example_inputs(config: FluxConfig, img_len: int, txt_len: int,
                   batch: int = 1) -> tuple[jax.Array, ...]:
    """Zero inputs of the right shapes for `Flux(config).init` / `jax.eval_shape`."""
    return (jnp.zeros((batch, img_len, config.in_channels)), jnp.zeros((batch, img_len, 3)),
            jnp.zeros((batch, txt_len, config.context_in_dim)), jnp.zeros((batch, txt_len, 3)),
            jnp.zeros((batch,)), jnp.zeros((batch, config.vec_in_dim)),
            jnp.zeros((batch,)) if config.guidance_embed else None)


def abstract_params(config: FluxConfig) -> Any:
    """`jax.eval_shape` of the params, leaves boxed with their logical axis names."""
    return jax.eval_shape(lambda rng: Flux(config).init(rng, *example_inputs(config, 1, 1))
                          ["params"], jax.random.key(0))


def init_params(config: FluxConfig, rng: jax.Array) -> Any:
    """Plain (unboxed) randomly initialised params."""
    return jax.jit(lambda r: nn.meta.unbox(
        Flux(config).init(r, *example_inputs(config, 1, 1))["params"]))(rng)
