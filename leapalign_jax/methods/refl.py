"""ReFL: one gradient step from a late rollout latent straight to the clean estimate.

Roll the ODE out without gradient to a random step `k` among the last M, predict the
clean latent in one step, `xhat = x_k - sigma_k v_theta(x_k)`, and score it. The gradient
is the single-step term `-sigma_k dv_theta(x_k)/dtheta` alone.
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


def sample_steps(rng: jax.Array, batch_size: int, num_steps: int, last_m: int) -> jax.Array:
    """Per-sample step `k`, uniform over the last M steps `[T - M, T)`, int32 (B,).

    M is capped at T, so a short schedule draws from all of it.
    """
    m = min(int(last_m), int(num_steps))
    return jax.random.randint(rng, (batch_size,), num_steps - m, num_steps, jnp.int32)


def default_config() -> ml_collections.ConfigDict:
    """ReFL as run in the LeapAlign comparison (FLUX.1-dev, HPSv2.1)."""
    c = ml_collections.ConfigDict()
    # k is drawn from the last M steps [T - M, T); paper: last 11 of 25 (capped at T).
    c.last_m = 11
    c.hinge_lambda = 0.55  # hinge max(0, lambda - r) (0.55 HPSv2.1, 0.4 PickScore, 13.5 HPSv3)
    c.objective = "hinge"  # "hinge": relu(hinge_lambda - r); "neg_reward": -r
    anchor_knob(c)
    return c


def loss(params: Params, frozen: Params, batch: Batch, rng: jax.Array, pipe: Pipeline,
         cfg: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ReFL loss `mean_b objective(r(decode(x_k - sigma_k v_theta(x_k))))`.

    `rng` splits into (noise, steps). The rollout is detached; the gradient flows only
    through the one velocity evaluated at `x_k`.
    """
    if int(cfg.last_m) < 1:
        raise ValueError(f"last_m={cfg.last_m} must be >= 1; ReFL draws k from the last "
                         "M steps (paper: 11 of 25)")
    rng_noise, rng_steps = jax.random.split(rng)
    x0 = initial_noise(rng_noise, batch, pipe)
    k = sample_steps(rng_steps, x0.shape[0], pipe.num_steps, cfg.last_m)

    velocity = conditioned_velocity(pipe, batch)
    # k < T, so the rollout can stop at x_{T-1}: one velocity call fewer.
    _, kept = flow.euler_rollout(velocity, params, x0, pipe.sigmas[:-1], keep=k[:, None])
    sigmas = jnp.asarray(pipe.sigmas, jnp.float32)
    x_hat = flow.clean_estimate(velocity, params, kept[:, 0], sigmas[k])

    rewards, terms = score(pipe, frozen, pipe.decode(frozen, x_hat), batch)
    value = jnp.mean(objective(rewards, cfg))
    metrics = reward_metrics(value, rewards, terms)
    metrics["k_mean"] = jnp.mean(k.astype(jnp.float32))
    return add_anchor(value, metrics, cfg, velocity, params, frozen, x_hat, rng)
