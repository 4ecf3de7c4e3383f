"""The toy autoencoder: 32x32x3 images <-> 8x8x4 latents (the shapes world's VAE).

A small convolutional autoencoder working at the latent resolution (each 4x4 pixel patch
is one latent position), trained on random renders. The reconstruction loss is per-pixel
binary cross-entropy on the decoder's logits (targets are the [0, 1] pixel values), plus
a small L2 penalty on the latents: on hard-edged images it trains far faster than MSE
through the sigmoid, whose gradient vanishes where pixels saturate at 0 or 1.

After training, a per-channel shift and scale are measured and stored with the params so
that `encode` gives latents of about zero mean and unit variance, as Flux's VAE scaling
factor and shift do. `decode` is cheap and differentiable, ending in a sigmoid so that
images are in [0, 1].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from leapalign_jax.pipeline import Params
from leapalign_jax.toy import checker, prompts, scenes, utils

LATENT_HW, LATENT_CHANNELS = 8, 4
LATENT_L2 = 1e-4  # keeps the raw latents bounded; the stored scale normalises them


def space_to_depth(x: jax.Array, f: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/f, W/f, f*f*C): each f x f patch becomes one position."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // f, w // f, f * f * c)


def depth_to_space(x: jax.Array, f: int) -> jax.Array:
    """Inverse of space_to_depth."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, f, f, c // (f * f)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * f, w * f, c // (f * f))


class ResBlock(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Conv(self.width, (3, 3))(nn.silu(x))
        return x + nn.Conv(self.width, (3, 3))(nn.silu(h))


class Encoder(nn.Module):
    """(B, 32, 32, 3) in [0, 1] -> raw latents (B, 8, 8, 4).

    Each 4x4 pixel patch becomes one latent position first (space-to-depth), so every
    convolution runs at 8x8: cheap on a CPU, and one latent position per patch.
    """

    width: int = 64
    depth: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.width, (3, 3))(space_to_depth(x * 2.0 - 1.0, 4))
        for _ in range(self.depth):
            x = ResBlock(self.width)(x)
        return nn.Conv(LATENT_CHANNELS, (1, 1))(nn.silu(x))


class Decoder(nn.Module):
    """Raw latents (B, 8, 8, 4) -> pixel logits (B, 32, 32, 3) (sub-pixel output)."""

    width: int = 64
    depth: int = 2

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        x = nn.Conv(self.width, (3, 3))(z)
        for _ in range(self.depth):
            x = ResBlock(self.width)(x)
        return depth_to_space(nn.Conv(16 * 3, (1, 1))(nn.silu(x)), 4)


def init_autoencoder(rng: jax.Array) -> Params:
    """{"encoder", "decoder", "latent_shift" (4,), "latent_scale" (4,)}; identity scaling."""
    k_enc, k_dec = jax.random.split(rng)
    image = jnp.zeros((1, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3))
    latent = jnp.zeros((1, LATENT_HW, LATENT_HW, LATENT_CHANNELS))
    return {"encoder": Encoder().init(k_enc, image)["params"],
            "decoder": Decoder().init(k_dec, latent)["params"],
            "latent_shift": jnp.zeros((LATENT_CHANNELS,)),
            "latent_scale": jnp.ones((LATENT_CHANNELS,))}


def encode(params: Params, images: jax.Array) -> jax.Array:
    """Images (B, 32, 32, 3) -> normalised latents (B, 8, 8, 4), ~unit variance."""
    raw = Encoder().apply({"params": params["encoder"]}, images)
    return (raw - params["latent_shift"]) * params["latent_scale"]


def decode(params: Params, latents: jax.Array) -> jax.Array:
    """Normalised latents (B, 8, 8, 4) -> images (B, 32, 32, 3) in [0, 1]."""
    raw = latents / params["latent_scale"] + params["latent_shift"]
    return jax.nn.sigmoid(Decoder().apply({"params": params["decoder"]}, raw))


def reconstruction_loss(params: Params, images: jax.Array) -> jax.Array:
    """Mean per-pixel binary cross-entropy of the round trip + LATENT_L2 * mean raw
    latent squared."""
    raw = Encoder().apply({"params": params["encoder"]}, images)
    logits = Decoder().apply({"params": params["decoder"]}, raw)
    bce = optax.sigmoid_binary_cross_entropy(logits, images)
    return jnp.mean(bce) + LATENT_L2 * jnp.mean(raw ** 2)


def train_autoencoder(rng: jax.Array, steps: int = 1000, batch: int = 32,
                      learning_rate: float = 2e-3, progress: bool = True,
                      return_losses: bool = False):
    """Trains the autoencoder on random renders and sets the latent shift/scale from
    1024 fresh renders. Adam; linear warm-up over the first tenth of the steps (at most
    50), then cosine decay to 5% of the peak rate.

    Returns params, or (params, per-step losses) with `return_losses`.
    """
    if steps < 1 or batch < 1:
        raise ValueError(f"train_autoencoder needs steps >= 1 and batch >= 1, got "
                         f"steps={steps}, batch={batch}")
    k_init, k_data = jax.random.split(rng)
    data = utils.numpy_rng(k_data)
    params = init_autoencoder(k_init)
    tx = optax.adam(optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, min(50, steps // 10)), steps, 0.05 * learning_rate))

    @jax.jit
    def step(state, images):
        params, opt_state = state
        loss, grads = jax.value_and_grad(reconstruction_loss)(params, images)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    # reconstruction_loss ignores the latent shift/scale, so Adam leaves them at
    # identity; they are measured afterwards.
    (params, _), losses = utils.fit(
        step, (params, tx.init(params)),
        lambda i: scenes.render_batch([scenes.sample_scene(data) for _ in range(batch)]),
        steps, "autoencoder", progress)
    raw = Encoder().apply({"params": params["encoder"]}, scenes.render_batch(
        [scenes.sample_scene(data) for _ in range(1024)]))
    params = {**params, "latent_shift": jnp.mean(raw, axis=(0, 1, 2)),
              "latent_scale": 1.0 / (jnp.std(raw, axis=(0, 1, 2)) + 1e-6)}
    return (params, losses) if return_losses else params


def roundtrip_score(params: Params, num: int = 600, seed: int = 0) -> dict[str, float]:
    """Checker accuracy on decode(encode(render)) of `num` category-balanced prompts."""
    rng = np.random.default_rng(seed)
    chosen, drawn = prompts.sample_pairs(rng, num, prompts.all_prompts())
    images = jax.jit(lambda p, x: decode(p, encode(p, x)))(params, scenes.render_batch(drawn))
    return checker.score(np.asarray(images), chosen)
