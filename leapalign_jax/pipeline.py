"""The frozen plumbing every alignment method shares: velocity, decoder, reward.

A method never sees a concrete model. It receives a `Pipeline` (static, closed over by
`jax.jit`) and the frozen parameters as an ordinary pytree argument, so the same method
code drives a 12B FLUX.1-dev, the toy shapes-world model, or a linear velocity in a test.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Params = Any  # a pytree of arrays
Cond = Any  # per-sample conditioning pytree (text tokens, pooled vector, ids, guidance)
Batch = dict[str, Any]  # {"cond": Cond, ...}; leaves are batch-first

# (params, x (B, L, C), sigma (B,), cond) -> velocity (B, L, C)
VelocityFn = Callable[[Params, jax.Array, jax.Array, Cond], jax.Array]
# (frozen, latents (B, L, C)) -> images (B, H, W, 3) in [0, 1]
DecodeFn = Callable[[Params, jax.Array], jax.Array]
# (frozen, images, batch) -> rewards (B,), or (rewards (B,), {term name: (B,)}) for a
# weighted sum whose terms are logged one by one
RewardFn = Callable[[Params, jax.Array, Batch], Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    """Static description of the generator and its frozen judges.

    Attributes:
      velocity: the (guided) velocity `v_theta(x, sigma, cond)`.
      decode: frozen, differentiable latent -> image map (VAE decoder).
      reward: frozen, differentiable image -> score map, higher is better; it may return
        `(total, {name: term})` to have each term of a weighted sum logged (`score`).
      sigmas: sampling schedule `sigma_0 = 1 > ... > sigma_T = 0`, shape (T + 1,).
      latent_shape: per-sample latent shape `(L, C)` (packed tokens).
    """

    velocity: VelocityFn
    decode: DecodeFn
    reward: RewardFn
    sigmas: np.ndarray
    latent_shape: tuple[int, ...]

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1


def score(pipe: Pipeline, frozen: Params, images: jax.Array, batch: Batch
          ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`(rewards (B,), terms)` of `pipe.reward`; terms is {} for a reward without any."""
    out = pipe.reward(frozen, images, batch)
    return out if isinstance(out, tuple) else (out, {})


def batch_size(batch: Batch) -> int:
    """B, the leading size of the conditioning leaves."""
    return jax.tree.leaves(batch["cond"])[0].shape[0]


def initial_noise(rng: jax.Array, batch: Batch, pipe: Pipeline) -> jax.Array:
    """Rollout noise `x_0 ~ N(0, 1)`, float32, shape (B,) + latent_shape."""
    return jax.random.normal(rng, (batch_size(batch),) + tuple(pipe.latent_shape), jnp.float32)


def conditioned_velocity(pipe: Pipeline, batch: Batch
                         ) -> Callable[[Params, jax.Array, jax.Array], jax.Array]:
    """`(params, x, sigma) -> v_theta(x, sigma, cond)` with the batch's conditioning bound."""
    return lambda p, x, s: pipe.velocity(p, x, s, batch["cond"])


@dataclasses.dataclass
class World:
    """What the trainer and the evaluator need of an experiment besides the method.

    Attributes:
      pipe: the static pipeline closed over by the jitted step.
      params: trainable generator parameters (plain arrays).
      param_axes: `jax.eval_shape` of the model init (leaves boxed with logical axis
        names), used to shard params and optimizer state; None replicates everything.
      frozen: frozen parameters passed to decode/reward.
      train_batch: `step -> Batch` of numpy arrays; deterministic in step, so the data
        position of a resumed run is its step.
      eval_batch: a fixed batch of evaluation prompts for image grids.
      fingerprint: a JSON-able description of every world knob that changes results,
        checked against checkpoints on resume.
      evaluate: `(params, out_dir) -> results` writing images, prompts.jsonl and
        results.json under out_dir (worlds with a judge), or None.
      eval_prompts: the prompt text of each row of `eval_batch` (captions of the image
        grids), or None.
      assemble: `(trainable, frozen) -> velocity params`, traced inside the jitted step;
        None means the trainable params are the velocity's params. A LoRA world
        (`world.with_lora`) trains adapters and assembles them with the frozen base here.
      model: the generator's architecture (a `FluxConfig`), which `task=export` writes
        with the weights; None for a world whose generator is not a Flux.
      frozen_axes: logical axes (boxed abstract trees) of top-level `frozen` entries that
        must be sharded like params (a LoRA world's frozen base); other frozen arrays are
        replicated unless already on the mesh.
    """

    pipe: Pipeline
    params: Params
    param_axes: Any
    frozen: Params
    train_batch: Callable[[int], Batch]
    eval_batch: Batch
    fingerprint: dict
    evaluate: Callable[[Params, str], dict] | None = None
    eval_prompts: list[str] | None = None
    assemble: Callable[[Params, Params], Params] | None = None
    model: Any = None
    frozen_axes: dict[str, Any] | None = None

    def velocity_params(self, trainable: Params, frozen: Params) -> Params:
        """The params `pipe.velocity` takes, from the trainable ones and the frozen tree."""
        return trainable if self.assemble is None else self.assemble(trainable, frozen)
