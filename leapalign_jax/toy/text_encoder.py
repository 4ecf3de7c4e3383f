"""The toy text encoder: the shapes world's stand-in for Flux's T5 + CLIP pair.

A small pre-LayerNorm transformer over word tokens. It returns per-token features (the
"T5" sequence the generator attends to) and a pooled vector (the "CLIP" vector that
modulates the generator). It is trained jointly with the generator, so this module only
defines it. The reward model's text tower reuses its `Block` with its own parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from leapalign_jax.pipeline import Params
from leapalign_jax.toy import tokenizer


def _dense(features: int, axes: tuple[str, str], name: str) -> nn.Dense:
    init = nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes)
    return nn.Dense(features, kernel_init=init, name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the real (non-[PAD]) tokens."""

    width: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        head_dim = self.width // self.num_heads
        qkv = _dense(3 * self.width, ("embed", "heads"), "qkv")(x)
        q, k, v = jnp.split(qkv.reshape(b, s, 3 * self.num_heads, head_dim), 3, axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim)
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return _dense(self.width, ("heads", "embed"), "out")(out.reshape(b, s, self.width))


class Block(nn.Module):
    """Pre-LN transformer block: attention, then a GELU MLP, each residual."""

    width: int
    num_heads: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        attn = SelfAttention(self.width, self.num_heads, name="attn")
        x = x + attn(nn.LayerNorm(name="attn_norm")(x), mask)
        h = nn.LayerNorm(name="mlp_norm")(x)
        h = _dense(self.mlp_ratio * self.width, ("embed", "mlp"), "mlp_in")(h)
        return x + _dense(self.width, ("mlp", "embed"), "mlp_out")(nn.gelu(h))


class TextEncoder(nn.Module):
    """token ids (B, S) -> (token features (B, S, txt_dim), pooled (B, vec_dim)).

    Features at [PAD] positions are zero; the pooled vector is a projection of the mean
    of the real tokens' final features.
    """

    vocab_size: int = 0  # 0: the shapes-world vocabulary
    max_len: int = tokenizer.MAX_LEN
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    txt_dim: int = 64
    vec_dim: int = 64

    @nn.compact
    def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        vocab = self.vocab_size or tokenizer.vocab_size()
        mask = ids != tokenizer.PAD_ID
        embed = nn.Embed(vocab, self.width, name="token_embed", embedding_init=(
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))))
        pos = self.param("pos_embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")), (self.max_len, self.width))
        x = embed(ids) + pos[: ids.shape[1]]
        for i in range(self.depth):
            x = Block(self.width, self.num_heads, name=f"block_{i}")(x, mask)
        x = nn.LayerNorm(name="final_norm")(x)
        m = mask[..., None].astype(x.dtype)
        feats = _dense(self.txt_dim, ("embed", "mlp"), "txt_proj")(x) * m
        mean = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        pooled = _dense(self.vec_dim, ("embed", "mlp"), "vec_proj")(mean)
        return feats, pooled


def init_text_encoder(rng: jax.Array, module: TextEncoder | None = None) -> Params:
    """Plain (unboxed) parameters of `module` (default: TextEncoder())."""
    module = TextEncoder() if module is None else module
    ids = jnp.zeros((1, module.max_len), jnp.int32)
    return nn.meta.unbox(module.init(rng, ids)["params"])
