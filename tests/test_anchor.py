"""The velocity anchor of the direct-gradient methods (anchor_coef): zero and gradient-free at
the reference, the exact added term elsewhere, a pull toward the reference, and the
trainer's reference when it is on."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from leapalign_jax import config_lib, methods, train
from leapalign_jax.world import build_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIRECT = ["leapalign", "refl", "draft", "draft_lv", "drtune", "alignprop"]
# LeapAlign for the exact checks (each compile costs ~30 s in CI); the others call the same
# `add_anchor` with their own clean latent (their knob and reference: the tests below).
CHECKED = ["leapalign"]


@pytest.fixture(scope="module")
def world():
    config = config_lib.load_config(os.path.join(ROOT, "configs", "random_flux.py"))
    config.train.batch_size = 2
    config.world.num_steps = 4
    return build_world(config)


_JITTED = {}


def _loss(world, name, coef, params):
    """(loss, metrics), gradient of method `name` with anchor_coef=coef at `params`."""
    if (name, coef) not in _JITTED:
        cfg = methods.default_config(name)
        cfg.anchor_coef = coef
        cfg = ml_collections.FrozenConfigDict(cfg)
        fn = methods.get_loss(name)
        _JITTED[name, coef] = jax.jit(jax.value_and_grad(
            lambda p, frozen, batch: fn(p, frozen, batch, jax.random.key(3), world.pipe, cfg),
            has_aux=True))
    frozen = dict(world.frozen, reference=world.params)
    return _JITTED[name, coef](params, frozen, jax.tree.map(jnp.asarray, world.train_batch(0)))


@pytest.mark.parametrize("name", CHECKED)
def test_anchor_is_zero_at_the_reference_and_exactly_added_elsewhere(world, name):
    (plain, _), grad = _loss(world, name, 0.0, world.params)
    (anchored, metrics), grad_a = _loss(world, name, 0.5, world.params)
    assert float(metrics["anchor"]) < 1e-10  # the same velocity, up to XLA rounding
    np.testing.assert_allclose(anchored, plain, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                 grad_a, grad)

    moved = jax.tree.map(lambda p: p * 1.05 + 0.01, world.params)
    (plain, _), _ = _loss(world, name, 0.0, moved)
    (anchored, metrics), _ = _loss(world, name, 0.5, moved)
    assert float(metrics["anchor"]) > 0
    np.testing.assert_allclose(anchored, plain + 0.5 * metrics["anchor"], rtol=1e-5)


def test_anchor_gradient_pulls_toward_the_reference(world):
    """A small step along minus the anchor's own gradient lowers the anchor."""
    moved = jax.tree.map(lambda p: p * 1.05 + 0.01, world.params)
    (_, m0), g0 = _loss(world, "leapalign", 0.0, moved)
    (_, m1), g1 = _loss(world, "leapalign", 0.5, moved)
    g_anchor = jax.tree.map(lambda a, b: (a - b) / 0.5, g1, g0)
    stepped = jax.tree.map(lambda p, g: p - 1e-2 * g, moved, g_anchor)
    (_, m2), _ = _loss(world, "leapalign", 0.5, stepped)
    assert float(m2["anchor"]) < float(m1["anchor"])


def test_every_direct_method_has_the_knob_off_by_default():
    for name in DIRECT:
        cfg = methods.default_config(name)
        assert cfg.anchor_coef == 0.0 and not methods.needs_reference(cfg)
        cfg.anchor_coef = 0.1
        assert methods.needs_reference(cfg), name


def test_trainer_provides_the_reference_when_the_anchor_is_on():
    config = config_lib.load_config(os.path.join(ROOT, "configs", "random_flux.py"))
    world = build_world(config)
    mesh, rules = train.mesh_and_rules(config)
    shardings = train.state_shardings(world, train.make_optimizer(config.optim), mesh, rules)
    config.method.anchor_coef = 0.1
    frozen, _ = train.place_frozen(config, world, mesh, rules, shardings)
    jax.tree.map(np.testing.assert_array_equal, frozen["reference"], world.params)
    config.method.anchor_coef = 0.0
    assert "reference" not in train.place_frozen(config, world, mesh, rules, shardings)[0]
