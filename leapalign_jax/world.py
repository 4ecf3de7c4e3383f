"""Worlds: everything a run needs besides the method — generator, judges, prompts.

A world bundles the `Pipeline` (velocity, decoder, reward, schedule), the trainable
parameters with their logical sharding axes, the frozen parameters, and a deterministic
prompt stream. `config.world.name` picks one:

- "random_flux": a tiny randomly initialised Flux with random text embeddings and a
  "redness" reward. Needs nothing on disk; used by tests and for smoke runs. Its
  evaluation is the mean redness of the evaluation prompts' samples.
- "shapes": the offline shapes world (leapalign_jax.toy), the default experiment.
- "flux": FLUX.1-dev from a diffusers folder, prompt files and a reward model
  (leapalign_jax/flux_world.py, configs/flux_dev.py).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from leapalign_jax import checkpoint, evaluate, flow, flux_world, parallel, sampling
from leapalign_jax.models import lora
from leapalign_jax.models.flux import Flux, FluxConfig, abstract_params, init_params
from leapalign_jax.pipeline import Batch, Params, Pipeline, World
from leapalign_jax.toy import world as shapes_world
from leapalign_jax.weights.flux import load_flux


def random_flux_config() -> ml_collections.ConfigDict:
    """Knobs of the "random_flux" world."""
    c = ml_collections.ConfigDict()
    c.name = "random_flux"
    c.latent_hw = 4  # packed latent is latent_hw x latent_hw tokens
    c.num_prompts = 32  # size of the random "prompt" table
    c.text_len = 8  # text tokens per prompt
    c.guidance = 3.5  # distilled-guidance input (used when the model has guidance_embed)
    c.num_steps = 8  # Euler steps of the rollout (T)
    c.num_eval_prompts = 8
    # A FLUX checkpoint (diffusers folder or BFL .safetensors) to start from instead of
    # random weights; its shapes then define the model and `model` below is ignored
    # (except dtype and remat).
    c.init_weights = ""
    # Rotary dims per id axis for an init_weights BFL file whose head dim is not 128
    # (FLUX.1's (16, 56, 56) is inferred); e.g. (4, 6, 6).
    c.init_axes_dim = ml_collections.config_dict.placeholder(tuple)
    # The Flux architecture (FluxConfig fields); tiny so a step is milliseconds on CPU.
    c.model = ml_collections.ConfigDict(dict(
        in_channels=16, vec_in_dim=16, context_in_dim=32, hidden_size=32, mlp_ratio=2.0,
        num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6), theta=10000,
        qkv_bias=True, guidance_embed=True, dtype="float32", remat="none",
        scan_blocks=False))
    return c


def flux_velocity(model: Any, img_ids: np.ndarray, txt_ids: np.ndarray,
                  guidance: float | None) -> Callable[..., jax.Array]:
    """`velocity(params, x, sigma, cond)` for a Flux module; cond = {"txt", "y"}."""

    def velocity(params, x, sigma, cond):
        b = x.shape[0]
        g = None if guidance is None else jnp.full((b,), guidance, x.dtype)
        return model.apply(
            {"params": params}, x, jnp.broadcast_to(img_ids, (b,) + img_ids.shape),
            cond["txt"], jnp.broadcast_to(txt_ids, (b,) + txt_ids.shape), sigma, cond["y"], g)

    return velocity


def _redness_decode(frozen: Params, x: jax.Array) -> jax.Array:
    """Parameter-free stand-in decoder: first 3 latent channels per token -> RGB pixels."""
    del frozen
    side = int(round(x.shape[1] ** 0.5))
    return jax.nn.sigmoid(x[..., :3].reshape(x.shape[0], side, side, 3))


def _redness_reward(frozen: Params, images: jax.Array, batch: Batch) -> jax.Array:
    """How much redder than green/blue an image is, in (-1, 1)."""
    del frozen, batch
    return jnp.mean(images[..., 0] - 0.5 * (images[..., 1] + images[..., 2]), axis=(1, 2))


def build_random_flux(config: ml_collections.ConfigDict) -> World:
    wc = config.world
    knobs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in wc.model.to_dict().items()}
    loaded = None
    if wc.init_weights:
        axes = None if wc.init_axes_dim is None else tuple(wc.init_axes_dim)
        file_config, loaded = load_flux(wc.init_weights, axes_dim=axes,
                                        scan_blocks=knobs["scan_blocks"])
        knobs = dict(dataclasses.asdict(file_config), dtype=knobs["dtype"], remat=knobs["remat"])
    model = Flux(FluxConfig(**knobs))
    mc = model.config
    seq = wc.latent_hw * wc.latent_hw
    img_ids = flow.image_ids(wc.latent_hw, wc.latent_hw)
    txt_ids = flow.text_ids(wc.text_len)
    guidance = wc.guidance if mc.guidance_embed else None
    table = np.random.default_rng(config.seed + 1)
    txt_table = table.standard_normal((wc.num_prompts, wc.text_len, mc.context_in_dim),
                                      dtype=np.float32)
    y_table = table.standard_normal((wc.num_prompts, mc.vec_in_dim), dtype=np.float32)

    def batch_of(ids: np.ndarray) -> Batch:
        return {"cond": {"txt": txt_table[ids], "y": y_table[ids]},
                "prompt_id": ids.astype(np.int32)}

    def train_batch(step: int, rows: np.ndarray | None = None) -> Batch:
        """Step `step`'s batch, or only its rows `rows` (this process's share on a pod).

        The global prompt ids are a function of (seed, step) alone, so every topology sees
        the same global batches; a process looks up the prompts of its rows only.
        """
        ids = np.random.default_rng([config.seed, step]).integers(
            0, wc.num_prompts, config.train.batch_size)
        return batch_of(ids if rows is None else ids[np.asarray(rows)])

    param_axes = abstract_params(mc)
    params = loaded if loaded is not None else init_params(mc, jax.random.key(config.seed))
    pipe = Pipeline(
        velocity=flux_velocity(model, img_ids, txt_ids, guidance),
        decode=_redness_decode, reward=_redness_reward,
        sigmas=flow.flux_sigmas(wc.num_steps, seq), latent_shape=(seq, mc.in_channels))
    eval_ids = np.arange(wc.num_eval_prompts) % wc.num_prompts
    eval_prompts = [f"random prompt {i}" for i in eval_ids]
    mesh = parallel.make_mesh(config.mesh.shape)

    def evaluate_redness(params: Params, out_dir: str) -> dict[str, Any]:
        """Samples the evaluation prompts on the mesh; writes them and their rewards."""
        sample = sampling.make_sample_fn(pipe)
        score = jax.jit(pipe.reward)

        def sample_and_score(params, frozen, batch, rng):
            images = sample(params, frozen, batch, rng)
            return images, score(frozen, images, batch)

        images, rewards = sampling.on_mesh(sample_and_score, mesh, params, {},
                                           batch_of(eval_ids), jax.random.key(config.seed + 1000))
        rewards = np.asarray(rewards, np.float64)
        results = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                   "num_images": len(eval_ids)}
        records = [{"prompt": text, "prompt_id": int(i), "reward": float(r)}
                   for text, i, r in zip(eval_prompts, eval_ids, rewards)]
        evaluate.write_eval(out_dir, np.asarray(images), records, results)
        return results

    return World(pipe=pipe, params=params, param_axes=param_axes, frozen={}, model=mc,
                 train_batch=train_batch, evaluate=evaluate_redness,
                 eval_prompts=eval_prompts, eval_batch=batch_of(eval_ids),
                 fingerprint={"world": "random_flux",
                              "model": json.loads(json.dumps(dataclasses.asdict(mc))),
                              "latent_shape": [seq, mc.in_channels],
                              "knobs": _result_knobs(wc),
                              "init_weights": (checkpoint.file_identity(wc.init_weights)
                                               if wc.init_weights else None)})


def _result_knobs(wc: ml_collections.ConfigDict) -> dict:
    """The world knobs that change training results (not paths or evaluation sizes)."""
    skip = {"init_weights", "cache_dir", "num_eval_prompts", "images_per_category",
            "num_grid_prompts", "eval_steps", "prompt_file"}
    return {k: v for k, v in json.loads(json.dumps(wc.to_dict(), default=str)).items()
            if k not in skip}


_BUILDERS: dict[str, Callable[[ml_collections.ConfigDict], World]] = {
    "random_flux": build_random_flux,
    "shapes": shapes_world.build,
    "flux": flux_world.build,
}


def lora_knobs() -> ml_collections.ConfigDict:
    """`config.lora`: train low-rank adapters instead of every weight (see models/lora.py).

    Attributes:
      enabled: False (the paper's full fine-tuning) or True: only the adapters are
        trained, EMA'd and checkpointed; the base weights stay frozen, sharded like params.
      rank, alpha, targets, dropout: as in `models.lora.lora_config`.
    """
    return lora.lora_config(enabled=False)


def with_lora(world: World, cfg: ml_collections.ConfigDict, seed: int) -> World:
    """`world` training LoRA adapters of its params, which become `frozen["base"]`.

    The velocity runs on `lora.attach(base, adapters)` (`World.assemble`), evaluation on
    the same, and the fingerprint gains the LoRA knobs. Abstract params (`jax.eval_shape`
    leaves, as `task=plan` builds) give abstract adapters.

    Raises:
      ValueError: a world without logical param axes (not a Flux) or a bad LoRA config.
    """
    if world.param_axes is None:
        raise ValueError("config.lora.enabled needs a Flux world with logical param axes "
                         "(random_flux or flux); set config.lora.enabled=False")
    if "base" in world.frozen:
        raise ValueError("this world's frozen tree already has a 'base' entry; LoRA cannot "
                         "be added to it")
    knobs = {k: v for k, v in cfg.to_dict().items() if k != "enabled"}
    boxed = lora.lora_abstract(world.param_axes, cfg)
    if isinstance(jax.tree.leaves(world.params)[0], jax.ShapeDtypeStruct):
        params = nn.meta.unbox(boxed)
    else:
        params = lora.init_lora(world.params, cfg, jax.random.fold_in(jax.random.key(seed), 7))
    base = world.params

    def assemble(adapters: Params, frozen: Params) -> Params:
        return lora.attach(frozen["base"], adapters, cfg)

    evaluate_fn = None
    if world.evaluate is not None:
        evaluate_fn = lambda adapters, out_dir: world.evaluate(  # noqa: E731
            lora.attach(base, adapters, cfg), out_dir)
    return dataclasses.replace(
        world, params=params, param_axes=boxed, frozen=dict(world.frozen, base=base),
        frozen_axes=dict(world.frozen_axes or {}, base=world.param_axes), assemble=assemble,
        evaluate=evaluate_fn, fingerprint=dict(world.fingerprint, lora=knobs))


def build_world(config: ml_collections.ConfigDict) -> World:
    """The world named by `config.world.name`, training LoRA adapters when
    `config.lora.enabled`."""
    name = config.world.name
    if name not in _BUILDERS:
        raise ValueError(f"unknown world {name!r}; set config.world.name to one of "
                         f"{sorted(_BUILDERS)}")
    world = _BUILDERS[name](config)
    if config.get("lora") is not None and config.lora.enabled:
        world = with_lora(world, config.lora, config.seed)
    return world
