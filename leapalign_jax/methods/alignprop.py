"""AlignProp / full backprop: the reward gradient through every Euler step of the rollout.

The clean latent `x_T` keeps its whole computation graph, so the gradient is the exact
chain rule through all T steps: with `J_i = I + (sigma_{i+1} - sigma_i) dv/dx(x_i)`,

    dx_T/dtheta = sum_i J_{T-1} ... J_{i+1} (sigma_{i+1} - sigma_i) dv_theta(x_i)/dtheta.

Each step is rematerialised (`jax.checkpoint`), so memory holds T latents, not T sets of
network activations. Random truncation (AlignProp's) keeps only the last K' ~ U[1, T] steps.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from leapalign_jax import flow
from leapalign_jax.methods import refl
from leapalign_jax.pipeline import Batch, Params, Pipeline, conditioned_velocity, initial_noise

sg = jax.lax.stop_gradient


def euler_chain(velocity_fn: flow.StepVelocityFn, params: Params, x: jax.Array,
                sigmas: np.ndarray | jax.Array, *, remat: bool = True,
                grad_from: jax.Array | int | None = None) -> jax.Array:
    """Euler steps from `x` through the schedule `sigmas` (n + 1,), gradient on.

    `remat` recomputes each step's activations in the backward pass. With `grad_from`
    (a traced or static step index), the outputs of steps `i < grad_from` are detached,
    so the gradient runs through steps `grad_from .. n-1` only.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def step(p, x, s, s_next):
        return flow.euler_step(velocity_fn, p, x, s, s_next)

    if remat:
        step = jax.checkpoint(step, prevent_cse=False)  # inside scan CSE is no concern

    def body(x, xs):
        i, s, s_next = xs
        x_next = step(params, x, s, s_next)
        if grad_from is not None:
            x_next = jnp.where(i < grad_from, sg(x_next), x_next)
        return x_next, None

    n = sigmas.shape[0] - 1
    x, _ = jax.lax.scan(body, x, (jnp.arange(n, dtype=jnp.int32), sigmas[:-1], sigmas[1:]))
    return x


def default_config() -> ml_collections.ConfigDict:
    """Full backprop through the rollout; AlignProp's truncation is opt-in."""
    c = ml_collections.ConfigDict()
    c.remat = True  # rematerialise each Euler step (memory ~ T latents, one extra forward)
    # True: gradient only through the last K' ~ U[1, T] steps, one K' per batch
    # (AlignProp's randomised truncation); False: through all T steps.
    c.truncate = False
    c.hinge_lambda = 0.55  # hinge max(0, lambda - r) (0.55 HPSv2.1, 0.4 PickScore, 13.5 HPSv3)
    c.objective = "hinge"  # "hinge": relu(hinge_lambda - r); "neg_reward": -r
    return c


def sample_truncation(rng: jax.Array, num_steps: int) -> jax.Array:
    """K' ~ U[1, T], the number of final steps the gradient runs through (int32 scalar)."""
    return jax.random.randint(rng, (), 1, num_steps + 1, jnp.int32)


def loss(params: Params, frozen: Params, batch: Batch, rng: jax.Array, pipe: Pipeline,
         cfg: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`mean_b objective(r(decode(x_T)))` with `x_T` differentiable through the rollout.

    `rng` splits into (noise, truncation).
    """
    rng_noise, rng_trunc = jax.random.split(rng)
    x0 = initial_noise(rng_noise, batch, pipe)
    num_steps = pipe.num_steps
    k = sample_truncation(rng_trunc, num_steps) if cfg.truncate else jnp.int32(num_steps)

    x_clean = euler_chain(conditioned_velocity(pipe, batch), params, x0, pipe.sigmas,
                          remat=cfg.remat, grad_from=(num_steps - k) if cfg.truncate else None)
    rewards = pipe.reward(frozen, pipe.decode(frozen, x_clean), batch)
    value = jnp.mean(refl.objective(rewards, cfg))
    metrics = refl.reward_metrics(value, rewards)
    metrics["grad_steps"] = k.astype(jnp.float32)
    return value, metrics
