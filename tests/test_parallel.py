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
from tests.devices import xla_flags


def _run_on_8_devices(script):
    """Runs `script` in a Python with 8 simulated CPU devices; returns its RESULT json."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])

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

    ref_v = pipe.velocity(world.params, x, sigma, batch["cond"])
    velocity = lambda p, x, s, c: pipe.velocity(p, x, s, c)
    # The rollout (the forward in a loop) on the mesh that splits all three axes; each
    # further mesh would cost a compile of its own.
    roll = jax.jit(lambda p, x0, cond: flow.euler_rollout(
        lambda q, y, s: pipe.velocity(q, y, s, cond), p, x0, pipe.sigmas)[0])
    ref_roll = roll(world.params, x, batch["cond"])
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
        out[str(shape)] = dict(
            v_err=float(jnp.max(jnp.abs(v - ref_v))),
            n_split=len(split), n_leaves=len(jax.tree.leaves(params)),
            v_sharded=not v.sharding.is_fully_replicated)
        if shape == (2, 2, 2):
            out["roll_err"] = float(jnp.max(jnp.abs(roll(params, xs, b["cond"]) - ref_roll)))

    def one_step_on_each_mesh(world):
        # A full train step on one device and on the (2, 2, 2) mesh: how far the two new
        # params differ and moved, and the frozen tree as the trainer placed it on each.
        states, frozens = {}, {}
        for name, devs, shape in [("one", jax.devices()[:1], (1, 1, 1)),
                                  ("eight", jax.devices(), (2, 2, 2))]:
            mesh = parallel.make_mesh(shape, devs)
            opt = train.make_optimizer(config.optim)
            sh = train.state_shardings(world, opt, mesh, parallel.DEFAULT_RULES)
            state = jax.jit(lambda p: train.create_train_state(p, opt, 0), out_shardings=sh)(
                world.params)
            frozens[name], _ = train.place_frozen(config, world, mesh, parallel.DEFAULT_RULES,
                                                  sh)
            step = jax.jit(train.make_train_step(world.pipe, config.method, opt, 0.9, 1.0,
                                                 world.assemble))
            state, _ = step(state, frozens[name], parallel.shard_batch(batch, mesh))
            states[name] = jax.device_get(state.params)
        diff = lambda a, b: max(jax.tree.leaves(jax.tree.map(  # noqa: E731
            lambda x, y: float(np.max(np.abs(x - y))), a, b)))
        return dict(max_diff=diff(states["one"], states["eight"]),
                    max_moved=diff(states["one"], jax.device_get(world.params))), frozens

    # One full train step on the (2, 2, 2) mesh equals the same step on one device.
    out["train_step"], _ = one_step_on_each_mesh(world)

    # LoRA: the frozen base sharded like the params; one step equals one device's.
    config.lora.update(dict(enabled=True, rank=4))
    config.optim.learning_rate = 1e-3
    out["lora_step"], frozens = one_step_on_each_mesh(build_world(config))
    out["lora_step"]["base_shards"] = {
        name: list(f["base"]["double_blocks_0"]["img_attn"]["qkv"]["kernel"]
                   .addressable_shards[0].data.shape) for name, f in frozens.items()}
    print("RESULT" + json.dumps(out))
""")


def test_sharded_forward_rollout_and_step_match_one_device():
    result = _run_on_8_devices(SCRIPT)
    for shape in ["(2, 2, 2)", "(1, 4, 2)", "(8, 1, 1)"]:
        r = result[shape]
        assert r["v_err"] < 1e-5, (shape, r)
        assert r["v_sharded"], (shape, r)  # the batch stays split through the network
        if shape != "(8, 1, 1)":  # pure data parallelism replicates weights
            assert r["n_split"] >= r["n_leaves"] // 3, (shape, r)
        else:
            assert r["n_split"] == 0, (shape, r)
    assert result["roll_err"] < 1e-4, result["roll_err"]
    step = result["train_step"]
    assert step["max_moved"] > 1e-6, step  # the step did update the params
    assert step["max_diff"] < 1e-5, step
    lora_step = result["lora_step"]
    assert lora_step["max_moved"] > 1e-6 and lora_step["max_diff"] < 1e-5, lora_step
    # qkv kernel (embed 64, 3, heads 4, 16): split by fsdp over embed, tensor over heads.
    assert lora_step["base_shards"] == {"one": [64, 3, 4, 16], "eight": [32, 3, 2, 16]}


TENSOR_SCRIPT = textwrap.dedent(r"""
    import json, re
    import flax, flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from leapalign_jax import parallel
    from leapalign_jax.models.flux import (DoubleStreamBlock, Flux, abstract_params, embed_nd,
                                           init_params, tiny_config)

    assert jax.device_count() == 8, jax.devices()
    config = tiny_config(hidden_size=64, num_heads=4)  # 4 heads of 16
    B, L, S = 8, 12, 5
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, dtype=np.float32),
                          jax.device_get(init_params(config, jax.random.key(0))))
    ids = np.zeros((B, L, 3), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(L)[None] // 4, np.arange(L)[None] % 4
    x = (rng.standard_normal((B, L, config.in_channels), dtype=np.float32), ids,
         rng.standard_normal((B, S, config.context_in_dim), dtype=np.float32),
         np.zeros((B, S, 3), np.float32), np.linspace(0.1, 0.9, B).astype(np.float32),
         rng.standard_normal((B, config.vec_in_dim), dtype=np.float32),
         np.full((B,), 3.5, np.float32))
    apply = Flux(config).apply
    ref = np.asarray(jax.jit(apply)({"params": params}, *x))
    out = {}

    def placed(shape):
        mesh = parallel.make_mesh(shape)
        return mesh, jax.device_put(params, parallel.logical_shardings(
            abstract_params(config), mesh))

    # (a) The forward, activation constraints on, equals one device; (2, 2, 2) is the
    # fsdp == tensor mesh of the XLA miscompile that the fsdp-major batch split avoids.
    for shape in [(2, 1, 4), (1, 2, 4), (2, 2, 2)]:
        mesh, p = placed(shape)
        xs = [parallel.shard_batch(a, mesh) for a in x]
        with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
            v = jax.jit(apply)({"params": p}, *xs)
        out[str(shape)] = dict(err=float(np.max(np.abs(np.asarray(v) - ref))),
                               scale=float(np.max(np.abs(ref))),
                               batch_split=not v.sharding.is_fully_replicated)

    # (b) Every shard of every qkv kernel holds whole heads, with their q, k and v.
    for shape in [(2, 1, 4), (1, 2, 4)]:
        mesh, p = placed(shape)
        full = flax.traverse_util.flatten_dict(params)
        shards = []
        for path, kernel in flax.traverse_util.flatten_dict(p).items():
            if path[-2:] == ("qkv", "kernel"):
                for s in kernel.addressable_shards:
                    h = s.index[2]
                    shards.append(dict(
                        path="/".join(path), shape=list(s.data.shape),
                        heads=[h.start or 0, config.num_heads if h.stop is None else h.stop],
                        exact=bool(np.array_equal(np.asarray(s.data), full[path][s.index]))))
        out["shards" + str(shape)] = shards

    # LoRA adapters sharded like their kernels; merging on the fly on the mesh.
    from leapalign_jax.models import lora
    cfg = lora.lora_config(rank=4)
    adapters = jax.tree.map(lambda a: a + 0.05, lora.init_lora(params, cfg, jax.random.key(1)))
    merged_apply = lambda p, a, *x: apply({"params": lora.merge(p, a, cfg)}, *x)
    ref_lora = np.asarray(jax.jit(merged_apply)(params, adapters, *x))
    mesh, p = placed((1, 2, 4))
    a = jax.device_put(adapters, parallel.logical_shardings(
        lora.lora_abstract(abstract_params(config), cfg), mesh))
    xs = [parallel.shard_batch(v, mesh) for v in x]
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
        v = jax.jit(merged_apply)(p, a, *xs)
    out["lora"] = dict(
        err=float(np.max(np.abs(np.asarray(v) - ref_lora))),
        scale=float(np.max(np.abs(ref_lora))),
        moved=float(np.max(np.abs(ref_lora - ref))),
        b_shard=list(a["double_blocks_0"]["img_attn"]["qkv"]["lora_b"]
                     .addressable_shards[0].data.shape),
        a_shard=list(a["double_blocks_0"]["img_attn"]["qkv"]["lora_a"]
                     .addressable_shards[0].data.shape))

    # (c) All-gathers in the compiled HLO of one DoubleStreamBlock, against kernel shapes.
    def block_gathers(shape):
        mesh = parallel.make_mesh(shape)
        block = DoubleStreamBlock(config)
        img, txt, vec = jnp.zeros((B, L, 64)), jnp.zeros((B, S, 64)), jnp.zeros((B, 64))
        pe = embed_nd(jnp.zeros((B, L + S, 3)), config.axes_dim, config.theta)
        abstract = jax.eval_shape(block.init, jax.random.key(0), img, txt, vec, pe)["params"]
        plain = nn.meta.unbox(abstract)
        kernels = {tuple(a.shape) for a in jax.tree.leaves(plain) if a.ndim >= 2}
        bs, ps = parallel.batch_sharding(mesh), parallel.logical_shardings(abstract, mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
            f = jax.jit(lambda p, i, t, v: block.apply({"params": p}, i, t, v, pe),
                        in_shardings=(ps, bs, bs, bs))
            hlo = f.lower(plain, img, txt, vec).compile().as_text()
        gathers = []
        for line in hlo.splitlines():
            m = re.search(r"= (.+?) all-gather(?:-start)?\(", line)
            if m:  # result shapes, e.g. "f32[64,3,4,16]{3,2,1,0}" or a tuple of them
                gathers += [tuple(int(d) for d in dims.split(",") if d)
                            for dims in re.findall(r"\w+\[([\d,]*)\]", m[1])]
        return dict(gathers=[list(g) for g in gathers],
                    kernel_gathers=[list(g) for g in gathers if g in kernels],
                    all_reduces=len(re.findall(r" all-reduce(?:-start)?\(", hlo)))

    out["hlo_tensor"] = block_gathers((2, 1, 4))
    out["hlo_fsdp"] = block_gathers((2, 4, 1))  # control: FSDP does gather whole kernels
    print("RESULT" + json.dumps(out))
""")


def test_tensor_parallel_by_head():
    """Heads split over "tensor": same forward, whole heads per shard, no kernel gathers."""
    result = _run_on_8_devices(TENSOR_SCRIPT)
    for shape in ["(2, 1, 4)", "(1, 2, 4)", "(2, 2, 2)"]:
        r = result[shape]  # outputs ~10: fp32 summation-order noise is ~1e-6 of them
        assert r["scale"] > 1 and r["err"] < 3e-6 * r["scale"], (shape, r)
        assert result[shape]["batch_split"], (shape, result[shape])
    for shape, fsdp in [("(2, 1, 4)", 1), ("(1, 2, 4)", 2)]:
        shards = result["shards" + shape]
        paths = {s["path"] for s in shards}
        assert paths == {"double_blocks_0/img_attn/qkv/kernel",
                         "double_blocks_0/txt_attn/qkv/kernel",
                         "single_blocks_0/linear1/qkv/kernel"}, paths
        for s in shards:
            # (embed / fsdp, q|k|v, one whole head, the full head dim)
            assert s["shape"] == [64 // fsdp, 3, 1, 16], s
            assert s["heads"][1] - s["heads"][0] == 1 and s["exact"], s
        for path in paths:
            covered = {tuple(s["heads"]) for s in shards if s["path"] == path}
            assert covered == {(h, h + 1) for h in range(4)}, (path, covered)
    adapters = result["lora"]
    assert adapters["moved"] > 1e-3, adapters
    assert adapters["err"] < 3e-6 * adapters["scale"], adapters
    assert adapters["b_shard"] == [4, 3, 1, 16] and adapters["a_shard"] == [32, 4], adapters
    tensor = result["hlo_tensor"]
    assert tensor["kernel_gathers"] == [], tensor
    # Only the small (B / data, 6 * hidden) modulation vectors are gathered, never a token
    # activation (a flat (embed, 3 * hidden) qkv kernel made XLA gather (B, L, 3 * hidden)).
    assert all(g == [4, 6 * 64] for g in tensor["gathers"]), tensor
    assert tensor["all_reduces"] > 0, tensor  # the row-parallel output projections
    assert len(result["hlo_fsdp"]["kernel_gathers"]) >= 6, result["hlo_fsdp"]  # parser works


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
