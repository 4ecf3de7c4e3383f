"""LoRA through the trainer: only the adapters are trained, EMA'd and checkpointed, the
reward rises, and task=export writes merged weights that load back with the trained
model's output (the frozen base's sharding: tests/test_parallel.py)."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leapalign_jax import checkpoint, config_lib, sampling, tasks, train
from leapalign_jax.models import lora
from leapalign_jax.weights.flux import load_flux
from leapalign_jax.world import build_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lora_config(steps=12, **lora_overrides):
    config = config_lib.load_config(os.path.join(ROOT, "configs", "random_flux.py"))
    config.train.update(steps=steps, image_every=0, log_every=4, checkpoint_every=100)
    config.lora.update(dict(dict(enabled=True, rank=4, alpha=4.0), **lora_overrides))
    config.world.model.mlp_ratio = 4.0  # diffusers' FluxTransformer2DModel fixes 4 (export)
    # Adapters start at B = 0; a higher rate than full fine-tuning moves them in 12 steps.
    config.optim.learning_rate = 3e-3
    return config


def mean_reward(world, trainable):
    params = world.velocity_params(trainable, world.frozen)
    images = sampling.make_sample_fn(world.pipe)(params, world.frozen, world.eval_batch,
                                                 jax.random.key(7))
    return float(jnp.mean(world.pipe.reward(world.frozen, images, world.eval_batch)))


def test_lora_leapalign_raises_the_reward_and_trains_only_adapters(tmp_path):
    config = lora_config()
    world = build_world(config)
    base = jax.tree.map(np.asarray, world.frozen["base"])
    assert lora.count_params(world.params) < 0.3 * lora.count_params(base)
    before = mean_reward(world, world.params)
    state = train.train_and_evaluate(config, str(tmp_path), world)
    after = mean_reward(world, state.params)
    assert after > before + 0.05, (before, after)

    # The state holds adapters only: params, EMA and both Adam moments.
    adapters = jax.tree.structure(world.params)
    assert jax.tree.structure(state.params) == adapters
    assert jax.tree.structure(state.ema_params) == adapters
    mu = state.opt_state[1][0].mu
    assert jax.tree.structure(mu) == adapters
    # B moved off zero; the frozen base did not move.
    flat = flax.traverse_util.flatten_dict(state.params)
    assert all(np.abs(v).max() > 0 for k, v in flat.items() if k[-1] == "lora_b")
    jax.tree.map(np.testing.assert_array_equal, base,
                 jax.tree.map(np.asarray, world.frozen["base"]))
    # The checkpoint is the adapters' size, not the model's.
    like = jax.eval_shape(lambda: state)
    restored = checkpoint.restore_params(str(tmp_path), like.ema_params,
                                         jax.tree.map(lambda x: x.sharding, state.ema_params))
    jax.tree.map(np.testing.assert_array_equal, restored[0], state.ema_params)


def test_lora_resume_refuses_other_lora_knobs(tmp_path):
    train.train_and_evaluate(lora_config(steps=2), str(tmp_path), build_world(lora_config()))
    other = lora_config(steps=4, rank=2)
    with pytest.raises(checkpoint.CheckpointError, match="lora"):
        train.train_and_evaluate(other, str(tmp_path), build_world(other))


def test_export_writes_merged_weights_that_load_back(tmp_path):
    config = lora_config(steps=3)
    world = build_world(config)
    state = train.train_and_evaluate(config, str(tmp_path), world)
    config.task = "export"
    out = tasks.run(config, str(tmp_path))
    merged = jax.tree.map(np.asarray, lora.merge(world.frozen["base"], state.ema_params,
                                                 config.lora))
    for path in (out["diffusers"], out["bfl"]):
        _, params = load_flux(path, axes_dim=tuple(config.world.model.axes_dim))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     params, merged)
    # The merged model samples what the adapted one does.
    sample = sampling.make_sample_fn(world.pipe)
    key = jax.random.key(3)
    adapted = sample(world.velocity_params(state.ema_params, world.frozen), world.frozen,
                     world.eval_batch, key)
    _, loaded = load_flux(out["diffusers"])
    np.testing.assert_allclose(sample(loaded, world.frozen, world.eval_batch, key), adapted,
                               atol=2e-5)
