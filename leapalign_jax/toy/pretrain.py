"""Pretraining the shapes world's generator: a tiny Flux and its text encoder.

The rectified-flow objective of Flux: `x_t = (1 - t) x_clean + t noise`, the network
regresses the velocity `noise - x_clean`, with `t` logit-normal as in SD3/Flux training.
The text encoder (the toy "T5 + CLIP") is trained jointly here and frozen afterwards, as
FLUX.1's text encoders are frozen during alignment. A fraction of captions is dropped to
the empty prompt so that classifier-free guidance is available.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from leapalign_jax import flow
from leapalign_jax.models.flux import Flux, FluxConfig, init_params
from leapalign_jax.pipeline import Params
from leapalign_jax.toy import autoencoder, prompts, scenes, tokenizer, utils
from leapalign_jax.toy.text_encoder import TextEncoder, init_text_encoder

PATCH = 2  # 8x8x4 latents -> 4x4 tokens of 16 channels
TOKENS_HW = autoencoder.LATENT_HW // PATCH


def flux_config(model: ml_collections.ConfigDict) -> FluxConfig:
    """The toy Flux: packed 8x8x4 latents, toy text features, no distilled guidance."""
    return FluxConfig(
        in_channels=autoencoder.LATENT_CHANNELS * PATCH * PATCH,
        vec_in_dim=model.text_dim, context_in_dim=model.text_dim,
        hidden_size=model.hidden_size, mlp_ratio=model.mlp_ratio, num_heads=model.num_heads,
        depth=model.depth, depth_single_blocks=model.depth_single_blocks,
        axes_dim=tuple(model.axes_dim), guidance_embed=False, dtype=model.dtype,
        remat=model.remat)


def text_encoder(model: ml_collections.ConfigDict) -> TextEncoder:
    return TextEncoder(width=model.text_width, depth=model.text_depth, num_heads=4,
                       txt_dim=model.text_dim, vec_dim=model.text_dim)


def rectified_flow_loss(params: Params, latents: jax.Array, ids: jax.Array, rng: jax.Array,
                        flux: Flux, text: TextEncoder) -> jax.Array:
    """Mean squared error of the predicted velocity against `noise - x_clean`."""
    b = latents.shape[0]
    txt, vec = text.apply({"params": params["text"]}, ids)
    rng_t, rng_noise = jax.random.split(rng)
    t = jax.nn.sigmoid(jax.random.normal(rng_t, (b,)))  # logit-normal(0, 1)
    noise = jax.random.normal(rng_noise, latents.shape)
    x_t = (1.0 - t[:, None, None]) * latents + t[:, None, None] * noise
    img_ids = jnp.broadcast_to(flow.image_ids(TOKENS_HW, TOKENS_HW), (b, latents.shape[1], 3))
    txt_ids = jnp.broadcast_to(flow.text_ids(ids.shape[1]), (b, ids.shape[1], 3))
    v = flux.apply({"params": params["flux"]}, x_t, img_ids, txt, txt_ids, t, vec)
    return jnp.mean(jnp.square(v - (noise - latents)))


def pretrain(rng: jax.Array, vae: Params, model: ml_collections.ConfigDict,
             progress: bool = True) -> tuple[dict[str, Params], np.ndarray]:
    """Trains {"flux", "text"} params on (render, caption) pairs of every prompt.

    Returns the params and the per-step losses. `model` is the world's `model` config.
    """
    flux, text = Flux(flux_config(model)), text_encoder(model)
    k_flux, k_text, k_data, k_steps = jax.random.split(rng, 4)
    params = {"flux": init_params(flux.config, k_flux), "text": init_text_encoder(k_text, text)}
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(
        0.0, model.learning_rate, max(1, min(100, model.pretrain_steps // 10)),
        model.pretrain_steps,
        0.1 * model.learning_rate), weight_decay=1e-4)
    data = utils.numpy_rng(k_data)
    empty = tokenizer.encode([""])[0]

    @jax.jit
    def step(state, batch):
        params, opt_state, i = state
        images, ids = batch
        latents = flow.pack_latents(autoencoder.encode(vae, images), patch_size=PATCH)
        loss, grads = jax.value_and_grad(rectified_flow_loss)(
            params, latents, ids, jax.random.fold_in(k_steps, i), flux, text)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, i + 1), loss

    def make_batch(i: int) -> tuple[np.ndarray, np.ndarray]:
        chosen, drawn = prompts.sample_pairs(data, model.pretrain_batch, prompts.all_prompts())
        ids = tokenizer.encode([p.text for p in chosen])
        drop = data.random(len(chosen)) < model.caption_dropout
        ids[drop] = empty
        return scenes.render_batch(drawn), ids

    state = (params, tx.init(params), jnp.zeros((), jnp.int32))
    (params, _, _), losses = utils.fit(step, state, make_batch, model.pretrain_steps,
                                       "pretrain flux", progress)
    return params, losses


def encode_prompts(text_params: Params, model: ml_collections.ConfigDict,
                   texts: list[str]) -> dict[str, Any]:
    """Frozen text features of `texts`: {"txt" (N, S, D), "y" (N, D), "tokens" (N, S)}."""
    ids = tokenizer.encode(texts)
    txt, vec = jax.jit(text_encoder(model).apply)({"params": text_params}, ids)
    return {"txt": np.asarray(txt), "y": np.asarray(vec), "tokens": ids}
