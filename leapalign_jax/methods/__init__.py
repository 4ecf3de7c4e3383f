"""Alignment methods. Each is a pure loss the trainer calls the same way:

    loss(params, frozen, batch, rng, pipe, cfg) -> (scalar loss, flat dict of scalar metrics)

`pipe` is a `leapalign_jax.pipeline.Pipeline`, `cfg` the method's ConfigDict
(`config.method`), and the method's default config documents its knobs. `METHODS` is the
registry: one row per method name.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import ml_collections

from leapalign_jax.methods import alignprop, draft, drtune, grpo, leapalign, refl
from leapalign_jax.methods.objectives import uses_anchor

LossFn = Callable[..., tuple[Any, dict[str, Any]]]


def _never(cfg: Any) -> bool:
    del cfg
    return False


class Method(NamedTuple):
    """One registry row.

    Attributes:
      loss: `loss(params, frozen, batch, rng, pipe, cfg) -> (loss, metrics)`.
      default_config: `() -> ConfigDict`, the documented default knobs.
      needs_reference: `cfg -> bool`, whether `loss` reads `frozen["reference"]` (the
        frozen initial params) under `cfg`.
    """

    loss: LossFn
    default_config: Callable[[], ml_collections.ConfigDict]
    needs_reference: Callable[[Any], bool] = _never


METHODS: dict[str, Method] = {
    "leapalign": Method(leapalign.loss, leapalign.default_config, uses_anchor),
    "refl": Method(refl.loss, refl.default_config, uses_anchor),
    "draft": Method(draft.draft_loss, draft.draft_config, uses_anchor),
    "draft_lv": Method(draft.draft_lv_loss, draft.draft_lv_config, uses_anchor),
    "drtune": Method(drtune.loss, drtune.default_config, uses_anchor),
    "alignprop": Method(alignprop.loss, alignprop.default_config, uses_anchor),
    "grpo": Method(grpo.loss, grpo.default_config, grpo.needs_reference),
}


def names() -> list[str]:
    return sorted(METHODS)


def _method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {names()}")
    return METHODS[name]


def get_loss(name: str) -> LossFn:
    """The loss function of method `name` (see the module docstring for its signature)."""
    return _method(name).loss


def default_config(name: str) -> ml_collections.ConfigDict:
    """The documented default ConfigDict of method `name`, with `name` set."""
    cfg = _method(name).default_config()
    cfg.name = name
    return cfg


def needs_reference(cfg: Any) -> bool:
    """Whether method `cfg.name`'s loss reads `frozen["reference"]` under `cfg`.

    The trainer then puts the frozen reference (initial) params there, e.g. for GRPO's KL
    to the reference policy (kl_coef > 0).
    """
    return bool(_method(cfg.name).needs_reference(cfg))
