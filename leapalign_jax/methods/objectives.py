"""The reward objectives the alignment methods minimise, and the metrics they all report.

Every reward-gradient method (LeapAlign and the ReFL / DRaFT / DRTune / AlignProp
baselines) turns per-sample rewards into a per-sample loss here, by default ReFL's hinge
`relu(lambda - r)`, so the methods are compared on the same objective.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

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
