"""Methods that read the reference policy get it from the trainer, sharded like the params."""

import os
import subprocess
import sys

import jax
import numpy as np

from leapalign_jax import config_lib, methods, train
from leapalign_jax.world import build_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grpo_with_kl_runs_from_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "leapalign_jax.main", "--config", "configs/random_flux.py:grpo",
         "--workdir", str(tmp_path), "--config.method.kl_coef=0.04", "--config.train.steps=2",
         "--config.train.log_every=1", "--config.train.image_every=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isdir(tmp_path / "checkpoints" / "2")


def test_reference_is_a_copy_of_the_initial_params_sharded_like_them():
    config = config_lib.load_config(os.path.join(ROOT, "configs", "random_flux.py:grpo"))
    config.method.kl_coef = 0.04
    assert methods.needs_reference(config.method)
    world = build_world(config)
    mesh, rules = train.mesh_and_rules(config)
    shardings = train.state_shardings(world, train.make_optimizer(config.optim), mesh, rules)
    frozen, frozen_sh = train.place_frozen(config, world, mesh, rules, shardings)
    for ref, init, sh, want in zip(jax.tree.leaves(frozen["reference"]),
                                   jax.tree.leaves(world.params),
                                   jax.tree.leaves(frozen_sh["reference"]),
                                   jax.tree.leaves(shardings.params)):
        np.testing.assert_array_equal(np.asarray(ref), np.asarray(init))
        assert ref.sharding == want and sh == want
    config.method.kl_coef = 0.0
    assert not methods.needs_reference(config.method)
    assert "reference" not in train.place_frozen(config, world, mesh, rules, shardings)[0]
