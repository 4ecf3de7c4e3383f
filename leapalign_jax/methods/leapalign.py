"""LeapAlign: two leaps from a detached rollout to the clean latent, reward on the real image.

One iteration (ALGORITHM.md, steps 1-9): roll the ODE out without gradient, pick two steps
`k < j`, leap `x_k -> x_j` and `x_j -> x_clean` with one Euler step each (gradient on),
connect each leap's end to the real rollout latent (value of the rollout, gradient of the
leap), discount the nested gradient through the second leap's input by `alpha`, and weigh
each sample by how closely its leaps agree with the long trajectory.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from leapalign_jax import flow
from leapalign_jax.flow import sg
from leapalign_jax.methods.objectives import add_anchor, anchor_knob, hinge, reward_metrics
from leapalign_jax.pipeline import (Batch, Params, Pipeline, batch_size,
                                    conditioned_velocity, initial_noise, score)


class LeapOutput(NamedTuple):
    """What `leap_to_clean` returns.

    Attributes:
      x_clean: `xtil_clean`, value of the rollout's clean latent `x_T`, gradient of the leaps.
      weight: trajectory-similarity weight `w = 1 / (max(d_j, tau) + max(d_clean, tau))`, (B,).
      d_j: `mean |x_j - xhat_j|` per sample, (B,).
      d_clean: `mean |x_T - xhat_clean|` per sample, (B,).
    """

    x_clean: jax.Array
    weight: jax.Array
    d_j: jax.Array
    d_clean: jax.Array


def _connect(real: jax.Array, leap: jax.Array) -> jax.Array:
    """Latent connector `leap + sg(real - leap)`: value of `real`, gradient of `leap`.

    Written as `real + (leap - sg(leap))` so the value is `real` bit for bit (`y - y == 0`),
    where `leap + (real - leap)` would be off by rounding.
    """
    return real + (leap - sg(leap))


def _mean_abs(d: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(d), axis=tuple(range(1, d.ndim)))


def _after(tree: Any) -> jax.Array:
    """A float32 zero computed from one element of every leaf of `tree`.

    Adding it to a value makes that value wait for the whole tree: a data dependency XLA
    must schedule by (optimization barriers are dropped before scheduling on CPU, and
    `0 * y` is not folded for floats, since `0 * inf` is NaN).
    """
    return 0.0 * sum(jnp.ravel(leaf)[0].astype(jnp.float32) for leaf in jax.tree.leaves(tree))


def recomputed_velocity(velocity_fn: flow.StepVelocityFn) -> flow.StepVelocityFn:
    """`velocity_fn` whose backward pass recomputes its forward once its cotangent arrives.

    For leap 1: gradient flows to the params only (the leap starts from a detached latent).
    Its activations would otherwise stay alive through leap 2's forward and backward, so
    the peak would hold two calls' activations; recomputed, it holds one call's at a time,
    for one more forward. The recomputation's input waits for the cotangent (`_after`), so
    XLA cannot schedule it early (which would keep its activations alive as long).
    """

    @jax.custom_vjp
    def call(params, x, sigma):
        return velocity_fn(params, x, sigma)

    def call_fwd(params, x, sigma):
        return velocity_fn(params, x, sigma), (params, x, sigma)

    def call_bwd(res, g):
        params, x, sigma = res
        x = x + _after(g).astype(x.dtype)
        _, vjp = jax.vjp(lambda p: velocity_fn(p, x, sigma), params)
        return vjp(g)[0], jnp.zeros_like(x), jnp.zeros_like(sigma)

    call.defvjp(call_fwd, call_bwd)
    return call


def finished_velocity(velocity_fn: flow.StepVelocityFn) -> flow.StepVelocityFn:
    """`velocity_fn` whose backward pass releases its input cotangent only together with
    its param cotangent.

    For leap 2: leap 1's backward needs only the input cotangent, so XLA may otherwise
    defer leap 2's weight-gradient matmuls past leap 1's recomputation and hold both
    calls' activations at once. Waiting for the param cotangent (`_after`) makes leap 2's
    backward finish first.
    """

    @jax.custom_vjp
    def call(params, x, sigma):
        return velocity_fn(params, x, sigma)

    def call_fwd(params, x, sigma):
        return jax.vjp(velocity_fn, params, x, sigma)

    def call_bwd(vjp, g):
        d_params, d_x, d_sigma = vjp(g)
        return d_params, d_x + _after(d_params).astype(d_x.dtype), d_sigma

    call.defvjp(call_fwd, call_bwd)
    return call


def leap_to_clean(velocity_fn: flow.StepVelocityFn, params: Params, x_k: jax.Array,
                  x_j: jax.Array, x_clean: jax.Array, sigma_k: jax.Array,
                  sigma_j: jax.Array, *, alpha: float, tau: float) -> LeapOutput:
    """Leap 1 (`x_k -> x_j`), connector, leap 2 (`x_j -> clean`), connector, weight.

    `x_k`, `x_j`, `x_clean` are detached rollout latents (batch first, any trailing shape);
    `sigma_k > sigma_j` are per-sample noise levels (B,). The gradient of `x_clean` is

        (s_j - s_k) dv_k/dtheta - s_j dv_j/dtheta - alpha s_j (s_j - s_k) dv_j/dx dv_k/dtheta

    and `weight`, `d_j`, `d_clean` carry none.
    """
    x_k, x_j, x_clean = sg(x_k), sg(x_j), sg(x_clean)

    # Leap 1, from the detached rollout latent x_k, recomputed in its backward pass.
    xhat_j = flow.euler_step(recomputed_velocity(velocity_fn), params, x_k, sigma_k, sigma_j)
    xtil_j = _connect(x_j, xhat_j)
    # Leap 2 starts from xtil_j, but its velocity input passes only the fraction alpha of
    # the nested gradient (its value is x_j either way).
    u = sg(xtil_j) + alpha * (xtil_j - sg(xtil_j))
    v_j = finished_velocity(velocity_fn)(params, u, jnp.broadcast_to(sigma_j, u.shape[:1]))
    xhat_clean = (xtil_j - flow.per_sample(sigma_j, x_j) * v_j).astype(x_j.dtype)
    xtil_clean = _connect(x_clean, xhat_clean)

    # Trajectory similarity: leaps that agree with the long trajectory weigh more.
    d_j = sg(_mean_abs(x_j - xhat_j))
    d_clean = sg(_mean_abs(x_clean - xhat_clean))
    weight = 1.0 / (jnp.maximum(d_j, tau) + jnp.maximum(d_clean, tau))
    return LeapOutput(xtil_clean, weight, d_j, d_clean)


def sample_step_pairs(rng: jax.Array, batch_size: int, min_idx: int, max_idx: int
                      ) -> tuple[jax.Array, jax.Array]:
    """Per-sample steps `k < j`, each unordered pair in `[min_idx, max_idx)` equally likely.

    Returns int32 arrays (B,). Raises ValueError if the range holds fewer than two steps.
    """
    n = int(max_idx) - int(min_idx)
    if n < 2:
        raise ValueError(f"step range [{min_idx}, {max_idx}) holds {max(n, 0)} step(s); "
                         "LeapAlign needs two distinct steps: widen min_idx / max_idx")
    rng_a, rng_b = jax.random.split(rng)
    # a uniform; b uniform over the other n - 1 values: every ordered distinct pair has
    # probability 1 / (n (n - 1)), so every unordered pair 2 / (n (n - 1)).
    a = jax.random.randint(rng_a, (batch_size,), 0, n, jnp.int32)
    b = jax.random.randint(rng_b, (batch_size,), 0, n - 1, jnp.int32)
    b = b + (b >= a).astype(jnp.int32)
    return jnp.minimum(a, b) + min_idx, jnp.maximum(a, b) + min_idx


def default_config() -> ml_collections.ConfigDict:
    """Paper defaults for FLUX.1-dev trained on HPSv2.1."""
    c = ml_collections.ConfigDict()
    c.alpha = 0.3  # nested-gradient discount in [0, 1] (0.3 HPSv2.1, 0.1 PickScore/HPSv3)
    c.tau = 0.1  # floor of each leap distance in the similarity weight
    c.hinge_lambda = 0.55  # hinge max(0, lambda - r) (0.55 HPSv2.1, 0.4 PickScore, 13.5 HPSv3)
    c.min_idx = 0  # steps k < j are drawn from [min_idx, max_idx)
    # None: T, the whole trajectory (the paper's better choice); typed so that
    # `--config.method.max_idx=12` parses as an int.
    c.max_idx = ml_collections.config_dict.placeholder(int)
    c.use_weight = True  # ablation: False weighs every sample 1
    anchor_knob(c)
    return c


def loss(params: Params, frozen: Params, batch: Batch, rng: jax.Array, pipe: Pipeline,
         cfg: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LeapAlign loss `mean_b sg(w_b) max(0, lambda - r_b)` and its metrics.

    `rng` splits into (noise, step pairs); `batch["cond"]` is the conditioning pytree.
    """
    num_steps = pipe.num_steps
    max_idx = num_steps if cfg.max_idx is None else int(cfg.max_idx)
    if not (0 <= cfg.min_idx and max_idx <= num_steps):
        raise ValueError(f"step range [{cfg.min_idx}, {max_idx}) must lie within "
                         f"[0, {num_steps}); fix min_idx / max_idx")
    rng_noise, rng_pairs = jax.random.split(rng)
    b = batch_size(batch)
    x0 = initial_noise(rng_noise, batch, pipe)
    k, j = sample_step_pairs(rng_pairs, b, cfg.min_idx, max_idx)

    velocity = conditioned_velocity(pipe, batch)
    x_clean, kept = flow.euler_rollout(velocity, params, x0, pipe.sigmas,
                                       keep=jnp.stack([k, j], axis=1))
    sigmas = jnp.asarray(pipe.sigmas, jnp.float32)
    out = leap_to_clean(velocity, params, kept[:, 0], kept[:, 1], x_clean, sigmas[k],
                        sigmas[j], alpha=cfg.alpha, tau=cfg.tau)

    rewards, terms = score(pipe, frozen, pipe.decode(frozen, out.x_clean), batch)
    weight = out.weight if cfg.use_weight else jnp.ones_like(out.weight)
    value = jnp.mean(sg(weight) * hinge(rewards, cfg.hinge_lambda))
    metrics = reward_metrics(value, rewards, terms)
    metrics.update({
        "weight_mean": jnp.mean(weight),
        "d_j": jnp.mean(out.d_j),
        "d_clean": jnp.mean(out.d_clean),
        "k_mean": jnp.mean(k.astype(jnp.float32)),
        "j_mean": jnp.mean(j.astype(jnp.float32)),
    })
    return add_anchor(value, metrics, cfg, velocity, params, frozen, x_clean, rng)
