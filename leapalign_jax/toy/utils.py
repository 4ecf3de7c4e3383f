"""Small helpers shared by the shapes world's training loops."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm


def numpy_rng(rng: jax.Array) -> np.random.Generator:
    """A numpy generator seeded by a JAX key, for the numpy side (scenes, prompts)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())


def fit(step_fn: Callable[[Any, Any], tuple[Any, jax.Array]], state: Any,
        make_batch: Callable[[int], Any], steps: int, desc: str,
        progress: bool = True) -> tuple[Any, np.ndarray]:
    """Runs `state, loss = step_fn(state, make_batch(i))` for i < steps under a tqdm bar.

    Returns the final state and the per-step losses.
    """
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for i in bar:
        state, loss = step_fn(state, make_batch(i))
        losses.append(loss)
        if i % 50 == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.4f}")
    return state, np.asarray(jax.device_get(losses), np.float32)
