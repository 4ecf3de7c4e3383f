"""The reward objectives the alignment methods minimise, and the metrics they all report.

Every reward-gradient method (LeapAlign and the ReFL / DRaFT / DRTune / AlignProp
baselines) turns per-sample rewards into a per-sample loss here, by default ReFL's hinge
`relu(lambda - r)`, so the methods are compared on the same objective.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from leapalign_jax.flow import per_sample, sg

OBJECTIVES = ("hinge", "neg_reward")


def hinge(rewards: jax.Array, hinge_lambda: float) -> jax.Array:
    """ReFL's hinge `relu(lambda - r)`, per sample: no push once a reward passes lambda."""
    return jax.nn.relu(hinge_lambda - rewards)


def objective(rewards: jax.Array, cfg: Any) -> jax.Array:
    """Per-sample loss to minimise, same shape as `rewards`: `cfg.objective` of the rewards.

    "hinge": `relu(cfg.hinge_lambda - r)`; "neg_reward": `-r`. Apply it to each sample's
    own reward (before any averaging): the objective is per sample.
    """
    if cfg.objective == "hinge":
        return hinge(rewards, cfg.hinge_lambda)
    if cfg.objective == "neg_reward":
        return -rewards
    raise ValueError(f"objective={cfg.objective!r} is unknown; use one of {OBJECTIVES}")


def reward_metrics(value: jax.Array, rewards: jax.Array,
                   terms: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """The metrics every method reports: loss, reward mean and spread over all rewards,
    and `reward_<name>`, the mean unweighted score of each term of a weighted reward."""
    metrics = {"loss": value, "reward_mean": jnp.mean(rewards), "reward_std": jnp.std(rewards)}
    for name, term in (terms or {}).items():
        metrics[f"reward_{name}"] = jnp.mean(term)
    return metrics


def anchor_knob(c: Any) -> None:
    """Adds `anchor_coef` to a direct-gradient method's config (see `velocity_anchor`)."""
    # Velocity-matching anchor to the reference (initial) model on the run's own samples,
    # renoised to a random level: a guard against reward hacking. 0: off (the paper's).
    c.anchor_coef = 0.0


def uses_anchor(cfg: Any) -> bool:
    """Whether the loss reads `frozen["reference"]` for the anchor (anchor_coef > 0)."""
    return cfg.get("anchor_coef", 0.0) > 0


def velocity_anchor(velocity: Callable[..., jax.Array], params: Any, frozen: Any,
                    x_clean: jax.Array, rng: jax.Array) -> jax.Array:
    """`mean ||v_theta(x_s, s) - v_ref(x_s, s)||^2` at `x_s = (1 - s) x_clean + s eps`.

    `x_clean` (detached) are the step's own samples, `s ~ U(0, 1)` per sample, `eps` fresh
    noise, `v_ref` the frozen reference (initial) params: the flow-matching path through
    what the model now generates, on which the update may not move the velocity far from
    the reference's. `velocity(params, x, s)` has the batch's conditioning bound.
    """
    if "reference" not in frozen:
        raise ValueError("anchor_coef > 0 needs the reference params in frozen['reference'] "
                         "(the trainer adds them); set anchor_coef=0 to run without")
    rng_s, rng_eps = jax.random.split(rng)
    x_clean = sg(x_clean)
    s = jax.random.uniform(rng_s, x_clean.shape[:1], jnp.float32)
    eps = jax.random.normal(rng_eps, x_clean.shape, x_clean.dtype)
    x_s = (1.0 - per_sample(s, x_clean)) * x_clean + per_sample(s, x_clean) * eps
    diff = velocity(params, x_s, s) - sg(velocity(frozen["reference"], x_s, s))
    return jnp.mean(jnp.square(diff.astype(jnp.float32)))


def add_anchor(value: jax.Array, metrics: dict[str, jax.Array], cfg: Any,
               velocity: Callable[..., jax.Array], params: Any, frozen: Any,
               x_clean: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`value + anchor_coef * velocity_anchor(...)` (and the anchor in the metrics) when
    `anchor_coef > 0`; `(value, metrics)` unchanged otherwise."""
    if not uses_anchor(cfg):
        return value, metrics
    anchor = velocity_anchor(velocity, params, frozen, x_clean,
                             jax.random.fold_in(rng, 0xA11C))
    value = value + cfg.anchor_coef * anchor
    return value, dict(metrics, loss=value, anchor=anchor)
