"""DRaFT-K and DRaFT-LV: the reward gradient through the last Euler steps only.

- **DRaFT-K** rolls the ODE out without gradient to `x_{T-K}` and takes the last K steps
  with gradient, so `dx_T/dtheta` is the chain rule through those K steps alone.
- **DRaFT-LV** (K = 1, lower variance) rolls out to the clean latent `x_T`, re-noises it
  n times to the last step's noise level, `x = (1 - s) x_T + s eps` with `s = sigma_{T-1}`,
  takes one gradient step `x - s v_theta(x, s)` from each, and averages the n copies'
  per-sample objectives (the hinge applies to each copy's own reward).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from leapalign_jax import flow
from leapalign_jax.methods.objectives import add_anchor, anchor_knob, objective, reward_metrics
from leapalign_jax.pipeline import (Batch, Params, Pipeline, conditioned_velocity, initial_noise,
                                    score)


def draft_config() -> ml_collections.ConfigDict:
    """DRaFT-K; paper default K = 1."""
    c = ml_collections.ConfigDict()
    c.k = 1  # Euler steps at the end of the rollout that carry gradient, in [1, T]
    c.hinge_lambda = 0.55  # hinge max(0, lambda - r) (0.55 HPSv2.1, 0.4 PickScore, 13.5 HPSv3)
    c.objective = "hinge"  # "hinge": relu(hinge_lambda - r); "neg_reward": -r
    anchor_knob(c)
    return c


def draft_lv_config() -> ml_collections.ConfigDict:
    """DRaFT-LV; paper default n = 2 re-noised copies."""
    c = ml_collections.ConfigDict()
    c.n = 2  # re-noised copies of x_T whose one-step objectives are averaged
    c.hinge_lambda = 0.55  # hinge max(0, lambda - r) (0.55 HPSv2.1, 0.4 PickScore, 13.5 HPSv3)
    # Per copy: "hinge": relu(hinge_lambda - r_copy); "neg_reward": -r_copy
    c.objective = "hinge"
    anchor_knob(c)
    return c


def renoise(x_clean: jax.Array, noise: jax.Array, sigma: jax.Array | float) -> jax.Array:
    """`(1 - sigma) x_clean + sigma noise`: the clean latent moved to noise level sigma."""
    return (1.0 - sigma) * x_clean + sigma * noise


def draft_loss(params: Params, frozen: Params, batch: Batch, rng: jax.Array,
               pipe: Pipeline, cfg: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DRaFT-K loss `mean_b objective(r(decode(x_T)))`, gradient through the last K steps.

    `rng` is the noise key. Steps beyond the first (K > 1) are rematerialised.
    """
    num_steps, k = pipe.num_steps, int(cfg.k)
    if not 1 <= k <= num_steps:
        raise ValueError(f"k={cfg.k} must be in [1, {num_steps}] (the rollout has "
                         f"{num_steps} steps); DRaFT-1 uses k=1")
    x0 = initial_noise(rng, batch, pipe)
    velocity = conditioned_velocity(pipe, batch)
    # No-gradient rollout of the first T - K steps, then K steps with gradient.
    x_start, _ = flow.euler_rollout(velocity, params, x0, pipe.sigmas[:num_steps - k + 1])
    x_clean = flow.euler_chain(velocity, params, x_start, pipe.sigmas[num_steps - k:],
                               remat=k > 1)

    rewards, terms = score(pipe, frozen, pipe.decode(frozen, x_clean), batch)
    value = jnp.mean(objective(rewards, cfg))
    return add_anchor(value, reward_metrics(value, rewards, terms), cfg, velocity, params,
                      frozen, x_clean, rng)


def draft_lv_loss(params: Params, frozen: Params, batch: Batch, rng: jax.Array,
                  pipe: Pipeline, cfg: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DRaFT-LV loss `mean_b mean_i objective(r(decode(x_i - s v_theta(x_i, s))))`.

    `rng` splits into (noise, re-noise); copy i draws its noise from
    `fold_in(re-noise key, i)`. The objective is per sample, so it applies to each copy's
    reward before the average over copies (a hinge of the averaged reward would stop
    pushing a copy below lambda whenever its twin lies far enough above).
    """
    n = int(cfg.n)
    if n < 1:
        raise ValueError(f"n={cfg.n} must be >= 1; DRaFT-LV averages n re-noised copies "
                         "(paper: 2)")
    rng_noise, rng_lv = jax.random.split(rng)
    x0 = initial_noise(rng_noise, batch, pipe)
    velocity = conditioned_velocity(pipe, batch)
    x_clean, _ = flow.euler_rollout(velocity, params, x0, pipe.sigmas)
    s = float(pipe.sigmas[-2])  # the last step's noise level sigma_{T-1}

    copies, copy_terms = [], []
    for i in range(n):
        x = renoise(x_clean, jax.random.normal(jax.random.fold_in(rng_lv, i), x_clean.shape,
                                               x_clean.dtype), s)
        x_hat = flow.clean_estimate(velocity, params, x, s)
        rewards, terms = score(pipe, frozen, pipe.decode(frozen, x_hat), batch)
        copies.append(rewards)
        copy_terms.append(terms)
    copies = jnp.stack(copies)  # (n, B)
    terms = jax.tree.map(lambda *t: jnp.stack(t), *copy_terms) if copy_terms[0] else {}

    value = jnp.mean(objective(copies, cfg))
    metrics = reward_metrics(value, copies, terms)
    metrics["copy_reward_std"] = jnp.mean(jnp.std(copies, axis=0))  # spread over the n copies
    return add_anchor(value, metrics, cfg, velocity, params, frozen, x_clean, rng)
