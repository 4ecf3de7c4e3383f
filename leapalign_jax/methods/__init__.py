"""Alignment methods. Each is a pure loss the trainer calls the same way:

    loss(params, frozen, batch, rng, pipe, cfg) -> (scalar loss, flat dict of scalar metrics)

`pipe` is a `leapalign_jax.pipeline.Pipeline`, `cfg` the method's ConfigDict
(`config.method`), and `default_config()` in the same module documents its knobs.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

# name -> module under leapalign_jax.methods; imported lazily so a method's extra
# dependencies are only needed when it runs.
_MODULES = {
    "leapalign": "leapalign",
    "refl": "refl",
    "draft": "draft",
    "draft_lv": "draft",
    "drtune": "drtune",
    "alignprop": "alignprop",
    "grpo": "grpo",
}


def names() -> list[str]:
    return sorted(_MODULES)


def _module(name: str) -> Any:
    if name not in _MODULES:
        raise ValueError(f"unknown method {name!r}; choose one of {names()}")
    return importlib.import_module(f"leapalign_jax.methods.{_MODULES[name]}")


def get_loss(name: str) -> Callable[..., Any]:
    """The loss function of method `name` (see the module docstring for its signature)."""
    module = _module(name)
    return getattr(module, f"{name}_loss", None) or module.loss


def default_config(name: str) -> Any:
    """The documented default ConfigDict of method `name`, with `name` set."""
    module = _module(name)
    make = getattr(module, f"{name}_config", None) or module.default_config
    cfg = make()
    cfg.name = name
    return cfg
