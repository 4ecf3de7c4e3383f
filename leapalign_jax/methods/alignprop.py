"""AlignProp / full backprop: the reward gradient through every Euler step of the rollout.

The clean latent `x_T` keeps its whole computation graph (`flow.euler_chain`), so the
gradient is the exact chain rule through all T steps: with
`J_i = I + (sigma_{i+1} - sigma_i) dv/dx(x_i)`,

    dx_T/dtheta = sum_i J_{T-1} ... J_{i+1} (sigma_{i+1} - sigma_i) dv_theta(x_i)/dtheta.

Each step is rematerialised (`remat`), so memory holds T latents, not T sets of network
activations. Random truncation (AlignProp's) keeps only the last K' ~ U[1, T] steps, and
the backward pass then differentiates those K' steps alone.
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


def default_config() -> ml_collections.ConfigDict:
    """Full backprop through the rollout; AlignProp's truncation is opt-in."""
    c = ml_collections.ConfigDict()
    # Rematerialise each Euler step (memory ~ T latents, one extra forward per step).
    # truncate=True always rematerialises and needs remat=True.
    c.remat = True
    # True: gradient only through the last K' ~ U[1, T] steps, one K' per batch
    # (AlignProp's randomised truncation; backward cost ~ K' steps); False: all T steps.
    c.truncate = False
    c.hinge_lambda = 0.55  # hinge max(0, lambda - r) (0.55 HPSv2.1, 0.4 PickScore, 13.5 HPSv3)
    c.objective = "hinge"  # "hinge": relu(hinge_lambda - r); "neg_reward": -r
    anchor_knob(c)
    return c


def sample_truncation(rng: jax.Array, num_steps: int) -> jax.Array:
    """K' ~ U[1, T], the number of final steps the gradient runs through (int32 scalar)."""
    return jax.random.randint(rng, (), 1, num_steps + 1, jnp.int32)


def loss(params: Params, frozen: Params, batch: Batch, rng: jax.Array, pipe: Pipeline,
         cfg: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`mean_b objective(r(decode(x_T)))` with `x_T` differentiable through the rollout.

    `rng` splits into (noise, truncation).
    """
    if cfg.truncate and not cfg.remat:
        raise ValueError("truncate=True recomputes the last K' steps in the backward pass; "
                         "set remat=True (or truncate=False)")
    rng_noise, rng_trunc = jax.random.split(rng)
    x0 = initial_noise(rng_noise, batch, pipe)
    num_steps = pipe.num_steps
    k = sample_truncation(rng_trunc, num_steps) if cfg.truncate else jnp.int32(num_steps)

    velocity = conditioned_velocity(pipe, batch)
    x_clean = flow.euler_chain(velocity, params, x0, pipe.sigmas,
                               remat=cfg.remat,
                               grad_from=(num_steps - k) if cfg.truncate else None)
    rewards, terms = score(pipe, frozen, pipe.decode(frozen, x_clean), batch)
    value = jnp.mean(objective(rewards, cfg))
    metrics = reward_metrics(value, rewards, terms)
    metrics["grad_steps"] = k.astype(jnp.float32)
    return add_anchor(value, metrics, cfg, velocity, params, frozen, x_clean, rng)
