"""Weighted sums of rewards: `"hpsv21:1.0,pickscore:0.05"` -> one pure score with terms.

The paper trains on one judge or a weighted mix; every term is returned beside the total
so each can be logged on its own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp

from leapalign_jax.rewards.base import Params, Reward

Weights = list[tuple[str, float]]


def parse_weights(spec: str | Sequence[Any] | Mapping[str, Any],
                  known: Iterable[str]) -> Weights:
    """Reward weights from `"name:w,name:w"` (a missing `:w` means 1), a list of such
    strings or of (name, weight) pairs, or a {name: weight} mapping.

    Raises a one-line ValueError for unknown names, non-numeric or non-finite weights,
    repeated names and empty specs.
    """
    known = sorted(known)
    if isinstance(spec, str):
        items: list[Any] = [s for s in spec.split(",") if s.strip()]
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = list(spec)
    weights: Weights = []
    for item in items:
        if isinstance(item, str):
            name, _, weight = item.partition(":")
            weight = weight.strip() or "1"
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            name, weight = item
        else:
            raise ValueError(f"reward weights {spec!r}: cannot read {item!r}; write "
                             "'name:weight,name:weight'")
        name = str(name).strip()
        if name not in known:
            raise ValueError(f"reward weights {spec!r}: unknown reward {name!r}; known: "
                             f"{', '.join(known)}")
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"reward weights {spec!r}: weight {weight!r} of {name} is not a "
                             "number") from None
        if not math.isfinite(value):
            raise ValueError(f"reward weights {spec!r}: weight of {name} must be finite")
        if name in dict(weights):
            raise ValueError(f"reward weights {spec!r}: {name} appears twice")
        weights.append((name, value))
    if not weights:
        raise ValueError(f"reward weights {spec!r}: no reward named; write e.g. 'hpsv21:1.0'")
    return weights


@dataclasses.dataclass(frozen=True, eq=False)
class CombinedReward:
    """Rewards summed with weights; the same shape of API as `Reward`.

    Attributes:
      rewards: name -> loaded Reward.
      weights: name -> weight (the order of the spec).
    """

    rewards: dict[str, Reward]
    weights: dict[str, float]

    @property
    def params(self) -> dict[str, Params]:
        return {name: r.params for name, r in self.rewards.items()}

    def encode_text(self, prompts: Sequence[str]) -> dict[str, jax.Array]:
        """name -> that reward's (B, D) text features."""
        return {name: r.encode_text(prompts) for name, r in self.rewards.items()}

    def score(self, params: dict[str, Params], images: jax.Array,
              text_features: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Pure and jittable: (weighted sum (B,), {name: unweighted term (B,)})."""
        terms = {name: r.score(params[name], images, text_features[name])
                 for name, r in self.rewards.items()}
        total = sum(self.weights[name] * term for name, term in terms.items())
        return jnp.asarray(total, jnp.float32), terms

    @functools.cached_property
    def _score_jit(self) -> Any:
        return jax.jit(self.score)

    def __call__(self, images: jax.Array,
                 prompts: Sequence[str]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(weighted sum (B,), terms) for images and prompts; differentiable in images."""
        return self._score_jit(self.params, images, self.encode_text(prompts))


def combine(rewards: Mapping[str, Reward], weights: Weights) -> CombinedReward:
    """A CombinedReward of the loaded `rewards` named in `weights` (from parse_weights)."""
    missing = [name for name, _ in weights if name not in rewards]
    if missing:
        raise ValueError(f"reward {missing[0]!r} is weighted but not loaded; load it or drop "
                         "it from the weights")
    return CombinedReward({name: rewards[name] for name, _ in weights}, dict(weights))
