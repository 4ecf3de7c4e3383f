"""GRPO family (Flow-GRPO / DanceGRPO): policy gradient over SDE sampling, no reward gradient.

Sampling explores with Flow-GRPO's SDE, whose marginals match the ODE's:

    x_next = x + [v + sig_t^2 / (2t) (x + (1 - t) v)] dt + sig_t sqrt(-dt) eps,
    sig_t = a sqrt(t / (1 - t)),   dt = sigma_next - sigma < 0,

so each transition is Gaussian with a log-probability under the policy. The raw rewards
become group-relative advantages `(r - mean_group) / (std_group + eps)` over samples of
the same prompt (as in Flow-GRPO and DanceGRPO; no hinge: a hinge would tie every sample
above lambda at 0 and leave a group of good samples without signal), and the loss is
PPO's clipped surrogate on the ratio `exp(logp_new - logp_old)`, plus an optional KL to
the frozen reference. The reward enters only through sg(advantage).

Guards: at `t = 1` the `1 - t` of sig_t is taken at `sigma_max = sigma_1` (Flow-GRPO's
choice), and the final step (to sigma_T = 0) is a plain Euler step: the clean sample is
noise-free and that step has no log-probability, so training steps come from [0, T - 1).

Log-probabilities are the mean over latent elements of the elementwise Gaussian
log-density (Flow-GRPO's normalisation), which keeps ratios O(1) at any resolution.

Batch layout: samples form consecutive groups of `group_size` that share a prompt. With
`repeat_prompts` (default) the loss builds them itself from the first B / group_size
prompts of the batch, so any prompt stream works; otherwise the batch must already be
laid out that way (`repeat_groups` does it).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from leapalign_jax import flow
from leapalign_jax.flow import sg
from leapalign_jax.methods.objectives import reward_metrics
from leapalign_jax.pipeline import (Batch, Params, Pipeline, batch_size,
                                    conditioned_velocity, initial_noise, score)

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def default_config() -> ml_collections.ConfigDict:
    """Flow-GRPO / DanceGRPO defaults."""
    c = ml_collections.ConfigDict()
    # Samples per prompt; B must be a multiple. 8 divides the paper's 64-prompt batch
    # (DanceGRPO uses 12, Flow-GRPO 24 images per prompt).
    c.group_size = 8
    c.repeat_prompts = True  # True: groups repeat the first B / group_size prompts
    c.noise_level = 0.7  # a in sig_t = a sqrt(t / (1 - t)) (Flow-GRPO: 0.7)
    # Steps whose log-prob is recomputed with gradient, drawn per sample without
    # replacement from [0, T - 1); capped at T - 1 (DanceGRPO: ~0.6 of 16 steps).
    c.num_train_timesteps = 10
    c.clip_range = 1e-4  # PPO ratio clip epsilon (Flow-GRPO, DanceGRPO: 1e-4)
    c.adv_eps = 1e-4  # eps in (r - mean) / (std + eps)
    c.adv_clip = 5.0  # advantages clipped to [-adv_clip, adv_clip] (both papers: 5)
    # KL to the reference policy (frozen["reference"]) at the training steps; 0: none
    # (DanceGRPO: 0; Flow-GRPO: 0.04).
    c.kl_coef = 0.0
    # Not used: advantages normalise the raw reward within each group. Kept so that a
    # config setting the hinge lambda for every method stays valid for GRPO too.
    c.hinge_lambda = 0.55
    return c


def needs_reference(cfg: Any) -> bool:
    """Whether the loss reads the reference policy's params, `frozen["reference"]`."""
    return cfg.kl_coef > 0


# --------------------------------------------------------------------------- pieces


def gaussian_logp(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """Mean over latent elements of `log N(x; mean, std^2)`, (B,); std broadcasts."""
    z = (x - mean) / std
    logp = -0.5 * z * z - jnp.log(std) - _HALF_LOG_2PI
    return jnp.mean(logp, axis=tuple(range(1, x.ndim)))


def sde_mean_std(v: jax.Array, x: jax.Array, sigma: jax.Array | float,
                 sigma_next: jax.Array | float, *, noise_level: float, sigma_max: float
                 ) -> tuple[jax.Array, jax.Array]:
    """Mean and std of the SDE transition `x -> x_next` given the velocity `v` at `x`.

    `sigma`, `sigma_next` are scalars or (B,); std is (B, 1, ..., 1). At `sigma = 1` the
    `1 - t` of sig_t uses `sigma_max` instead (sig_t would be infinite).
    """
    t = flow.per_sample(sigma, x)
    dt = flow.per_sample(sigma_next, x) - t
    sig = noise_level * jnp.sqrt(t / (1.0 - jnp.minimum(t, sigma_max)))
    mean = x + (v + sig ** 2 / (2.0 * t) * (x + (1.0 - t) * v)) * dt
    return mean, sig * jnp.sqrt(-dt)


def sde_step(velocity_fn: flow.StepVelocityFn, params: Params, x: jax.Array,
             sigma: jax.Array | float, sigma_next: jax.Array | float,
             noise: jax.Array | None = None, *, noise_level: float, sigma_max: float,
             x_next: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One SDE step and the log-probability of its transition: `(x_next, logp (B,))`.

    Samples `x_next = mean + std * noise`, or, given `x_next`, scores that recorded
    transition instead. `logp` carries gradient through the mean only (x_next detached).
    """
    s = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    mean, std = sde_mean_std(velocity_fn(params, x, s), x, s, sigma_next,
                             noise_level=noise_level, sigma_max=sigma_max)
    if x_next is None:
        x_next = mean + std * noise
    return x_next, gaussian_logp(sg(x_next), mean, std)


def sde_rollout(velocity_fn: flow.StepVelocityFn, params: Params, x0: jax.Array,
                sigmas: np.ndarray | jax.Array, rng: jax.Array, *, noise_level: float
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Samples the SDE from `x0`, without gradient: `(x_T, latents, logps)`.

    `latents` (B, T + 1, ...) holds `x_0 .. x_T`; `logps` (B, T - 1) the log-probabilities
    of the T - 1 stochastic transitions. Step i draws its noise from `fold_in(rng, i)`; the
    final step is a plain Euler step. `sigma_max` is `sigmas[1]`.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    num_steps = sigmas.shape[0] - 1
    params, x0 = sg(params), sg(x0)
    sigma_max = sigmas[min(1, num_steps)]

    def body(x, xs):
        i, s, s_next = xs
        noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
        x_next, logp = sde_step(velocity_fn, params, x, s, s_next, noise,
                                noise_level=noise_level, sigma_max=sigma_max)
        return x_next, (x_next, logp)

    steps = (jnp.arange(num_steps - 1, dtype=jnp.int32), sigmas[:-2], sigmas[1:-1])
    x, (xs, logps) = jax.lax.scan(body, x0, steps)
    x_clean = flow.euler_step(velocity_fn, params, x, sigmas[-2], sigmas[-1])
    latents = jnp.concatenate([x0[None], xs, x_clean[None]], axis=0)
    return sg(x_clean), sg(jnp.moveaxis(latents, 0, 1)), sg(logps.T)


def _check_groups(batch_size: int, group_size: int) -> None:
    if group_size < 1 or batch_size % group_size:
        raise ValueError(f"batch of {batch_size} samples is not a whole number of groups of "
                         f"group_size={group_size}; make the batch a multiple of it")


def group_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-4) -> jax.Array:
    """`(r - mean_group) / (std_group + eps)` over consecutive groups of raw rewards, (B,).

    Raises ValueError if B is not a multiple of group_size.
    """
    b = rewards.shape[0]
    _check_groups(b, group_size)
    g = rewards.reshape(b // group_size, group_size)
    adv = (g - jnp.mean(g, axis=1, keepdims=True)) / (jnp.std(g, axis=1, keepdims=True) + eps)
    return adv.reshape(b)


def grpo_objective(logp_new: jax.Array, logp_old: jax.Array, advantages: jax.Array,
                   clip_range: float) -> jax.Array:
    """PPO's clipped surrogate to minimise, `mean max(-A ratio, -A clip(ratio, 1 +- eps))`.

    `logp_*` are (B, K) per training step, `advantages` (B,) shared by a sample's steps.
    """
    ratio = jnp.exp(logp_new - logp_old)
    adv = advantages[:, None]
    clipped = jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return jnp.mean(jnp.maximum(-adv * ratio, -adv * clipped))


def repeat_groups(batch: Batch, group_size: int) -> Batch:
    """Every sample of `batch` repeated `group_size` times consecutively (B -> B * G)."""
    return jax.tree.map(lambda a: jnp.repeat(jnp.asarray(a), group_size, axis=0), batch)


def sample_train_steps(rng: jax.Array, batch_size: int, num_candidates: int, k: int
                       ) -> jax.Array:
    """Per sample, k distinct steps from [0, num_candidates), int32 (B, k)."""
    order = jnp.argsort(jax.random.uniform(rng, (batch_size, num_candidates)), axis=1)
    return order[:, :k].astype(jnp.int32)


# --------------------------------------------------------------------------- loss


def _take(a: jax.Array, idx: jax.Array) -> jax.Array:
    """a (B, N, ...) gathered at idx (B, K) along axis 1 -> (B, K, ...)."""
    idx = idx.reshape(idx.shape + (1,) * (a.ndim - 2))
    return jnp.take_along_axis(a, idx, axis=1)


def loss(params: Params, frozen: Params, batch: Batch, rng: jax.Array, pipe: Pipeline,
         cfg: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO loss for the first inner step of the trainer's one-call interface.

    `rng` splits into (noise, SDE, steps). The trajectory is sampled with sg(params), the
    old policy; new log-probs are recomputed with gradient at `num_train_timesteps` steps
    per sample. The old policy is the current one here, so `logp_old = sg(logp_new)` and
    the ratio is exactly 1 in value; the rollout's own log-probs (equal up to rounding,
    metric `logp_gap`) are what a multi-epoch inner loop would keep. Each step's
    recomputation is rematerialised, so memory holds one step's activations.
    """
    b, g = batch_size(batch), int(cfg.group_size)
    _check_groups(b, g)
    num_steps = pipe.num_steps
    if num_steps < 2:
        raise ValueError("GRPO needs a schedule of at least 2 steps (the last one is "
                         "deterministic); raise the number of Euler steps")
    k = min(int(cfg.num_train_timesteps), num_steps - 1)
    if k < 1:
        raise ValueError(f"num_train_timesteps={cfg.num_train_timesteps} must be >= 1")
    if needs_reference(cfg) and "reference" not in frozen:
        raise ValueError("kl_coef > 0 needs the reference params in frozen['reference']; "
                         "add them or set kl_coef=0")
    if cfg.repeat_prompts:
        batch = jax.tree.map(lambda a: jnp.repeat(jnp.asarray(a)[:b // g], g, axis=0), batch)

    rng_noise, rng_sde, rng_steps = jax.random.split(rng, 3)
    x0 = initial_noise(rng_noise, batch, pipe)
    velocity = conditioned_velocity(pipe, batch)
    sigmas = jnp.asarray(pipe.sigmas, jnp.float32)
    sigma_max = sigmas[1]
    x_clean, latents, logps = sde_rollout(velocity, params, x0, sigmas, rng_sde,
                                          noise_level=cfg.noise_level)

    rewards, terms = sg(score(pipe, frozen, pipe.decode(frozen, x_clean), batch))
    advantages = group_advantages(rewards, g, cfg.adv_eps)
    advantages = sg(jnp.clip(advantages, -cfg.adv_clip, cfg.adv_clip))

    steps = sample_train_steps(rng_steps, b, num_steps - 1, k)
    x_t, x_next, logp_rollout = _take(latents, steps), _take(latents, steps + 1), \
        jnp.take_along_axis(logps, steps, axis=1)
    use_kl = needs_reference(cfg)

    @jax.checkpoint
    def step_terms(p, x, x_n, t):
        s, s_next = sigmas[t], sigmas[t + 1]
        mean, std = sde_mean_std(velocity(p, x, s), x, s, s_next,
                                 noise_level=cfg.noise_level, sigma_max=sigma_max)
        logp = gaussian_logp(x_n, mean, std)
        kl = jnp.zeros_like(logp)
        if use_kl:
            ref_mean, _ = sde_mean_std(velocity(sg(frozen["reference"]), x, s), x, s, s_next,
                                       noise_level=cfg.noise_level, sigma_max=sigma_max)
            # KL of two Gaussians with the same std, per latent element.
            kl = jnp.mean((mean - ref_mean) ** 2 / (2.0 * std ** 2),
                          axis=tuple(range(1, x.ndim)))
        return logp, kl

    def body(_, xs):
        return None, step_terms(params, *xs)

    _, (logp_new, kl) = jax.lax.scan(
        body, None, (jnp.moveaxis(x_t, 1, 0), jnp.moveaxis(x_next, 1, 0), steps.T))
    logp_new, kl = logp_new.T, kl.T  # (B, K)

    logp_old = sg(logp_new)  # first inner step: the sampling policy is the current one
    policy_loss = grpo_objective(logp_new, logp_old, advantages, cfg.clip_range)
    value = policy_loss + cfg.kl_coef * jnp.mean(kl)

    ratio = jnp.exp(logp_new - logp_old)
    metrics = reward_metrics(value, rewards, terms)
    metrics.update({
        "policy_loss": policy_loss,
        "kl": jnp.mean(kl),
        "ratio_mean": jnp.mean(ratio),
        "clip_frac": jnp.mean((jnp.abs(ratio - 1.0) > cfg.clip_range).astype(jnp.float32)),
        "advantage_abs_mean": jnp.mean(jnp.abs(advantages)),
        "logp_gap": jnp.mean(jnp.abs(logp_rollout - sg(logp_new))),
    })
    return value, metrics
