"""DRTune: detached network inputs, gradient on the velocity at K evenly spaced steps.

The chain runs from noise to the stop step `t_min`, then leaps to the clean estimate:

    x_{i+1} = x_i + (c_{i+1} - c_i) v_theta(sg(x_i), c_i),   i = 0 .. t_min,

over the chain schedule `c = (sigma_0, ..., sigma_{t_min}, 0)`; its last step is the leap
`x_{t_min} - sigma_{t_min} v_theta(x_{t_min})`. Every network input is detached, and only
the K training steps `t_i = s + i floor(n / K)` (n = t_min + 1 chain steps, s ~ U[0,
floor(n / K))) keep the gradient of v. So the clean estimate's gradient is

    sum_i (c_{t_i + 1} - c_{t_i}) dv_theta(x_{t_i})/dtheta,

with no input-Jacobian (dv/dx) term at all. `t_min = T - 1` (the default) is no early
stop: the chain is the whole rollout, whose last Euler step is the leap.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from leapalign_jax import flow
from leapalign_jax.flow import sg
from leapalign_jax.methods.objectives import add_anchor, anchor_knob, objective, reward_metrics
from leapalign_jax.pipeline import (Batch, Params, Pipeline, conditioned_velocity, initial_noise,
                                    score)


def default_config() -> ml_collections.ConfigDict:
    """DRTune as run in the LeapAlign comparison."""
    c = ml_collections.ConfigDict()
    c.k = 2  # training steps whose velocity keeps its gradient, evenly spaced
    # Stop step: leap to the clean estimate from x_{t_min}, a step index in [0, T - 1].
    # None: T - 1, no early stop (the leap from x_{T-1} is the rollout's own last step).
    c.t_min = ml_collections.config_dict.placeholder(int)
    c.hinge_lambda = 0.55  # hinge max(0, lambda - r) (0.55 HPSv2.1, 0.4 PickScore, 13.5 HPSv3)
    c.objective = "hinge"  # "hinge": relu(hinge_lambda - r); "neg_reward": -r
    anchor_knob(c)
    return c


def chain_sigmas(sigmas: np.ndarray, t_min: int) -> np.ndarray:
    """`(sigma_0, ..., sigma_{t_min}, 0)`: the rollout's schedule cut at t_min, then the leap."""
    return np.concatenate([np.asarray(sigmas[:t_min + 1], np.float32),
                           np.zeros((1,), np.float32)])


def sample_train_steps(rng: jax.Array, batch_size: int, num_chain_steps: int, k: int
                       ) -> jax.Array:
    """Per-sample training steps `t_i = s + i floor(n / K)`, s ~ U[0, floor(n / K)).

    Returns int32 (B, K), increasing along K, all in [0, n).
    """
    gap = num_chain_steps // k
    s = jax.random.randint(rng, (batch_size, 1), 0, gap, jnp.int32)
    return s + gap * jnp.arange(k, dtype=jnp.int32)[None, :]


def loss(params: Params, frozen: Params, batch: Batch, rng: jax.Array, pipe: Pipeline,
         cfg: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DRTune loss `mean_b objective(r(decode(x_clean)))`.

    `rng` splits into (noise, steps). The value of `x_clean` is the chain's (rollout to
    `t_min`, then the leap); its gradient is the sum of the K detached-input velocity
    terms, each computed once more with gradient from the kept rollout latent.
    """
    num_steps, k = pipe.num_steps, int(cfg.k)
    t_min = num_steps - 1 if cfg.t_min is None else int(cfg.t_min)
    if not 0 <= t_min <= num_steps - 1:
        raise ValueError(f"t_min={cfg.t_min} must be a step index in [0, {num_steps - 1}]; "
                         "set it to None for no early stop")
    if not 1 <= k <= t_min + 1:
        raise ValueError(f"k={cfg.k} must be in [1, {t_min + 1}] (the chain to t_min={t_min} "
                         "has that many steps); lower k or raise t_min")
    rng_noise, rng_steps = jax.random.split(rng)
    x0 = initial_noise(rng_noise, batch, pipe)
    steps = sample_train_steps(rng_steps, x0.shape[0], t_min + 1, k)

    velocity = conditioned_velocity(pipe, batch)
    chain = jnp.asarray(chain_sigmas(pipe.sigmas, t_min))
    x_stop, kept = flow.euler_rollout(velocity, params, x0, chain[:-1], keep=steps)
    x_value = sg(flow.clean_estimate(velocity, sg(params), x_stop, chain[t_min]))

    # Gradient part: the training steps' increments with gradient on v only.
    increments = 0.0
    for i in range(k):
        t = steps[:, i]
        dt = flow.per_sample(chain[t + 1] - chain[t], x0)
        increments = increments + dt * velocity(params, kept[:, i], chain[t])
    x_clean = x_value + (increments - sg(increments))  # value of the chain, gradient of v

    rewards, terms = score(pipe, frozen, pipe.decode(frozen, x_clean), batch)
    value = jnp.mean(objective(rewards, cfg))
    metrics = reward_metrics(value, rewards, terms)
    metrics["train_step_mean"] = jnp.mean(steps.astype(jnp.float32))
    return add_anchor(value, metrics, cfg, velocity, params, frozen, x_value, rng)
