"""Sharding over a simulated 8-device CPU mesh equals the 1-device computation.

XLA fixes the device count at start-up, so the 8-device case runs in a subprocess with
`--xla_force_host_platform_device_count=8`.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from leapalign_jax import parallel

SCRIPT = textwrap.dedent(r"""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from leapalign_jax import flow, parallel, train
    from leapalign_jax.config_lib import base_config
    from leapalign_jax.world import build_world

    assert jax.device_count() == 8, jax.devices()
    config = base_config()
    config.world.model.hidden_size = 64
    config.world.model.num_heads = 4
    config.world.model.axes_dim = (4, 6, 6)
    config.train.batch_size = 8
    world = build_world(config)
    pipe = world.pipe
    batch = world.train_batch(0)
    x = jax.random.normal(jax.random.key(1), (8,) + pipe.latent_shape)
    sigma = jnp.full((8,), 0.7)
    out = {}

    one = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    ref_v = pipe.velocity(world.params, x, sigma, batch["cond"])
    velocity = lambda p, x, s, c: pipe.velocity(p, x, s, c)
    for shape in [(2, 2, 2), (1, 4, 2), (8, 1, 1)]:
        mesh = parallel.make_mesh(shape)
        sh = parallel.logical_shardings(world.param_axes, mesh)
        params = jax.device_put(world.params, sh)
        b = parallel.shard_batch(batch, mesh)
        xs = jax.device_put(x, parallel.batch_sharding(mesh))
        v = jax.jit(velocity)(params, xs, jax.device_put(sigma, parallel.batch_sharding(mesh)),
                              b["cond"])
        split = [k for k, a in zip(jax.tree_util.tree_leaves_with_path(params),
                                   jax.tree.leaves(params))
                 if a.addressable_shards[0].data.size < a.size]
        roll = jax.jit(lambda p, x0: flow.euler_rollout(
            lambda q, y, s: pipe.velocity(q, y, s, b["cond"]), p, x0, pipe.sigmas)[0])
        out[str(shape)] = dict(
            v_err=float(jnp.max(jnp.abs(v - ref_v))),
            roll_err=float(jnp.max(jnp.abs(roll(params, xs) - roll(world.params, x)))),
            n_split=len(split), n_leaves=len(jax.tree.leaves(params)),
            v_sharded=not v.sharding.is_fully_replicated)

    # One full train step on the (2, 2, 2) mesh equals the same step on one device.
    states = {}
    for name, devs, shape in [("one", jax.devices()[:1], (1, 1, 1)),
                              ("eight", jax.devices(), (2, 2, 2))]:
        mesh = parallel.make_mesh(shape, devs)
        opt = train.make_optimizer(config.optim)
        sh = train.state_shardings(world, opt, mesh, parallel.DEFAULT_RULES)
        state = jax.jit(lambda p: train.create_train_state(p, opt, 0), out_shardings=sh)(
            world.params)
        step = jax.jit(train.make_train_step(pipe, config.method, opt, 0.9))
        state, metrics = step(state, {}, parallel.shard_batch(batch, mesh))
        states[name] = jax.device_get(state.params)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                         states["one"], states["eight"]))
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                         states["one"], jax.device_get(world.params)))
    out["train_step"] = dict(max_diff=max(diffs), max_moved=max(moved))
    print("RESULT" + json.dumps(out))
""")


def test_sharded_forward_rollout_and_step_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    result = json.loads(line[len("RESULT"):])
    for shape in ["(2, 2, 2)", "(1, 4, 2)", "(8, 1, 1)"]:
        r = result[shape]
        assert r["v_err"] < 1e-5, (shape, r)
        assert r["roll_err"] < 1e-4, (shape, r)
        assert r["v_sharded"], (shape, r)  # the batch stays split through the network
        if shape != "(8, 1, 1)":  # pure data parallelism replicates weights
            assert r["n_split"] >= r["n_leaves"] // 3, (shape, r)
        else:
            assert r["n_split"] == 0, (shape, r)
    step = result["train_step"]
    assert step["max_moved"] > 1e-6, step  # the step did update the params
    assert step["max_diff"] < 1e-5, step


def test_make_mesh_fills_and_rejects():
    import jax
    mesh = parallel.make_mesh((-1, 1, 1))
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="devices"):
        parallel.make_mesh((2, 3, 1))
    with pytest.raises(ValueError, match="3 entries"):
        parallel.make_mesh((1, 1))


def test_fit_drops_axes_that_do_not_divide():
    import types
    from jax.sharding import PartitionSpec as P
    mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 4, "tensor": 2})
    assert parallel._fit(P("fsdp", "tensor"), (8, 4), mesh) == P("fsdp", "tensor")
    assert parallel._fit(P("fsdp", "tensor"), (6, 4), mesh) == P(None, "tensor")
    assert parallel._fit(P(("data", "fsdp")), (4, 3), mesh) == P("data", None)
    assert parallel._fit(P(("data", "fsdp")), (16,), mesh) == P(("data", "fsdp"))
