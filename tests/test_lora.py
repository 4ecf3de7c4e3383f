"""LoRA adapters on the tiny Flux: init equals the base, merge maths, export round trips
(BFL file and diffusers folder, read back by us and by diffusers), gradients, shardings."""

import dataclasses
import functools
import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leapalign_jax import parallel
from leapalign_jax.models import lora
from leapalign_jax.models.flux import (DenseGeneral, Flux, abstract_params, stack_blocks,
                                       tiny_config, unstack_blocks)
from leapalign_jax.weights.flux import load_flux, save_flux_bfl, save_flux_diffusers

CONFIG = tiny_config(depth=2, depth_single_blocks=1)
B, H, W, S = 2, 3, 4, 5
CFG = lora.lora_config(rank=4, alpha=8.0)


def _random_params(config, seed=0, std=0.3):
    """Every parameter random (biases and norm scales too), so each term matters."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: (rng.standard_normal(p.shape) * std
                   / np.sqrt(p.shape[0] if p.ndim >= 2 else 1)).astype(np.float32),
        nn.meta.unbox(abstract_params(config)))


def _perturbed(lora_params, seed=1, std=0.5):
    """Adapters with random B (and A unchanged): a trained-looking update."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (rng.standard_normal(x.shape, dtype=np.float32) * std
                         if path[-1].key == "lora_b" else x), lora_params)


def _inputs(config, seed=0):
    rng = np.random.default_rng(seed)
    img_ids = np.zeros((H, W, 3), np.float32)
    img_ids[..., 1], img_ids[..., 2] = np.arange(H)[:, None], np.arange(W)[None]
    return dict(
        img=rng.standard_normal((B, H * W, config.in_channels), dtype=np.float32),
        img_ids=img_ids.reshape(-1, 3), txt_ids=np.zeros((S, 3), np.float32),
        txt=rng.standard_normal((B, S, config.context_in_dim), dtype=np.float32),
        timesteps=np.array([0.3, 0.9], np.float32),
        y=rng.standard_normal((B, config.vec_in_dim), dtype=np.float32),
        guidance=np.array([3.5, 1.0], np.float32) if config.guidance_embed else None)


@functools.lru_cache(maxsize=None)
def _jitted_apply(config):
    return jax.jit(Flux(config).apply)


def _forward(config, params, x):
    batched = lambda ids: np.broadcast_to(ids, (B,) + ids.shape)  # noqa: E731
    return np.asarray(_jitted_apply(config)(
        {"params": params}, x["img"], batched(x["img_ids"]), x["txt"], batched(x["txt_ids"]),
        x["timesteps"], x["y"], x["guidance"]))


@pytest.fixture(scope="module")
def adapted():
    """(base params, perturbed adapters, merged params)."""
    base = _random_params(CONFIG)
    adapters = _perturbed(lora.init_lora(base, CFG, jax.random.key(0)))
    merged = jax.jit(lambda p, a: lora.merge(p, a, CFG))(base, adapters)
    return base, adapters, jax.device_get(merged)


def test_init_targets_shapes_and_identity():
    base = _random_params(CONFIG)
    adapters = lora.init_lora(base, CFG, jax.random.key(0))
    flat = flax.traverse_util.flatten_dict(adapters)
    modules = {"/".join(p[:-1]) for p in flat}
    per_double = {f"{s}_attn/{k}" for s in ("img", "txt") for k in ("qkv", "proj")} | {
        f"{s}_mlp_{i}" for s in ("img", "txt") for i in (0, 2)}
    assert modules == ({f"double_blocks_{b}/{m}" for b in range(2) for m in per_double}
                       | {"single_blocks_0/linear1/qkv", "single_blocks_0/linear1/mlp",
                          "single_blocks_0/linear2/attn", "single_blocks_0/linear2/mlp"})
    a, b = flat[("double_blocks_1", "txt_attn", "qkv", "lora_a")], flat[
        ("double_blocks_1", "txt_attn", "qkv", "lora_b")]
    assert a.shape == (32, 4) and b.shape == (4, 3, 2, 16)
    assert flat[("single_blocks_0", "linear2", "attn", "lora_a")].shape == (2, 16, 4)
    assert flat[("single_blocks_0", "linear2", "attn", "lora_b")].shape == (4, 32)
    assert all(not np.any(v) for k, v in flat.items() if k[-1] == "lora_b")
    assert all(np.std(v) > 0.05 for k, v in flat.items() if k[-1] == "lora_a")
    # rank x (in + out) per adapter: qkv 32+96, proj 32+32, mlp in 32+128, mlp out 128+32
    per_block = 2 * (128 + 64 + 160 + 160)
    single = 128 + 160 + 64 + 160
    assert lora.count_params(adapters) == 4 * (2 * per_block + single)

    # B = 0: the merged params are the base, exactly, and so is the forward.
    merged = lora.merge(base, adapters, CFG)
    jax.tree.map(np.testing.assert_array_equal, merged, base)
    x = _inputs(CONFIG)
    np.testing.assert_array_equal(_forward(CONFIG, merged, x), _forward(CONFIG, base, x))

    # Only the targets given: one pattern, one kind of kernel.
    only = lora.init_lora(base, lora.lora_config(rank=2, targets=[r".*/linear1/qkv"]),
                          jax.random.key(0))
    assert list(flax.traverse_util.flatten_dict(only)) == [
        ("single_blocks_0", "linear1", "qkv", "lora_a"),
        ("single_blocks_0", "linear1", "qkv", "lora_b")]


def test_merge_equals_hand_computation(adapted):
    base, adapters, merged = adapted
    s = CFG.alpha / CFG.rank
    for module, n_in in [(("double_blocks_0", "img_attn", "qkv"), 1),
                         (("double_blocks_1", "txt_attn", "proj"), 2),
                         (("single_blocks_0", "linear2", "attn"), 2),
                         (("single_blocks_0", "linear1", "mlp"), 1)]:
        w = np.asarray(flax.traverse_util.flatten_dict(base)[module + ("kernel",)], np.float64)
        node = flax.traverse_util.flatten_dict(adapters)
        a = np.asarray(node[module + ("lora_a",)], np.float64)
        b = np.asarray(node[module + ("lora_b",)], np.float64)
        fan_in = int(np.prod(w.shape[:n_in]))
        w_flat = w.reshape(fan_in, -1)
        a_flat, b_flat = a.reshape(fan_in, -1), b.reshape(CFG.rank, -1)
        got = flax.traverse_util.flatten_dict(merged)[module + ("kernel",)]
        np.testing.assert_allclose(got.reshape(fan_in, -1), w_flat + s * a_flat @ b_flat,
                                   rtol=1e-5, atol=1e-6)
        # The merged layer is x @ W + s (x @ A) @ B.
        x = np.random.default_rng(2).standard_normal((3,) + w.shape[:n_in]).astype(np.float32)
        layer = DenseGeneral(w.shape[n_in:], (None,) * w.ndim, in_dims=n_in, use_bias=False)
        out = layer.apply({"params": {"kernel": got}}, x)
        x_flat = np.asarray(x, np.float64).reshape(3, fan_in)
        hand = x_flat @ w_flat + s * (x_flat @ a_flat) @ b_flat
        np.testing.assert_allclose(np.asarray(out).reshape(3, -1), hand, rtol=1e-4, atol=1e-5)
    x = _inputs(CONFIG)
    assert np.abs(_forward(CONFIG, merged, x) - _forward(CONFIG, base, x)).max() > 1e-2


def test_export_round_trip(adapted, tmp_path):
    _, _, merged = adapted
    x = _inputs(CONFIG, seed=3)
    ref = _forward(CONFIG, merged, x)
    save_flux_bfl(tmp_path / "flux.safetensors", CONFIG, merged)
    save_flux_diffusers(tmp_path / "pipe" / "transformer", CONFIG, merged)
    cfg = json.loads((tmp_path / "pipe" / "transformer" / "config.json").read_text())
    assert cfg["_class_name"] == "FluxTransformer2DModel" and cfg["num_layers"] == 2
    for path, kwargs in [(tmp_path / "flux.safetensors", dict(axes_dim=(4, 6, 6))),
                         (tmp_path / "pipe", {})]:
        config, params = load_flux(path, **kwargs)
        assert config == CONFIG, path
        jax.tree.map(np.testing.assert_array_equal, params, merged)  # bit-identical
        np.testing.assert_array_equal(_forward(config, params, x), ref)


def test_diffusers_reads_export(adapted, tmp_path):
    import torch
    from diffusers import FluxTransformer2DModel

    _, _, merged = adapted
    save_flux_diffusers(tmp_path / "transformer", CONFIG, merged)
    model = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    x = _inputs(CONFIG, seed=4)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    with torch.no_grad():
        ref = model(t(x["img"]), t(x["txt"]), t(x["y"]), t(x["timesteps"]), t(x["img_ids"]),
                    t(x["txt_ids"]), t(x["guidance"])).sample.numpy()
    out = _forward(CONFIG, merged, x)
    assert np.abs(ref).max() > 0.1
    assert np.abs(out - ref).max() < 1e-4, np.abs(out - ref).max()


def test_export_without_qkv_bias_and_errors(tmp_path):
    config = dataclasses.replace(CONFIG, qkv_bias=False)
    params = _random_params(config)
    save_flux_diffusers(tmp_path / "t", config, params)  # zero q, k, v biases
    loaded_config, loaded = load_flux(tmp_path / "t")
    assert loaded_config == CONFIG
    assert not np.any(loaded["double_blocks_0"]["img_attn"]["qkv"]["bias"])
    x = _inputs(config)
    np.testing.assert_allclose(_forward(CONFIG, loaded, x), _forward(config, params, x),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="mlp_ratio"):
        save_flux_diffusers(tmp_path / "u", dataclasses.replace(CONFIG, mlp_ratio=2.0),
                            _random_params(dataclasses.replace(CONFIG, mlp_ratio=2.0)))
    wrong = _random_params(CONFIG)
    del wrong["double_blocks_1"]["img_attn"]["proj"]
    with pytest.raises(ValueError, match=r"double_blocks_1/img_attn/proj/kernel"):
        save_flux_bfl(tmp_path / "w.safetensors", CONFIG, wrong)


def test_gradient_reaches_adapters_only():
    base = _random_params(CONFIG)
    adapters = lora.init_lora(base, CFG, jax.random.key(0))
    x = _inputs(CONFIG)

    def loss(lora_params, join):
        params = join(base, lora_params, CFG)
        return jnp.sum(jnp.sin(_jitted_apply(CONFIG)(
            {"params": params}, x["img"], x["img_ids"][None].repeat(B, 0), x["txt"],
            x["txt_ids"][None].repeat(B, 0), x["timesteps"], x["y"], x["guidance"])))

    grad_fn = jax.jit(jax.grad(functools.partial(loss, join=lora.attach)))
    merged_grad_fn = jax.jit(jax.grad(functools.partial(loss, join=lora.merge)))
    grad = grad_fn(adapters)
    # The gradient is a tree of adapters only: nothing for the frozen base.
    assert jax.tree.structure(grad) == jax.tree.structure(adapters)
    assert lora.count_params(grad) == lora.count_params(adapters)
    flat = flax.traverse_util.flatten_dict(grad)
    for path, g in flat.items():
        if path[-1] == "lora_b":
            assert np.abs(g).max() > 1e-6, path
        else:  # dL/dA = dL/dW' B^T = 0 while B = 0
            assert not np.any(g), path
    perturbed = _perturbed(adapters)
    grad = grad_fn(perturbed)
    assert all(np.abs(g).max() > 1e-6 for g in jax.tree.leaves(grad))
    # The low-rank path x @ W + (x @ A) @ B (what training runs) has the merged model's
    # value and gradient.
    np.testing.assert_allclose(loss(perturbed, lora.attach), loss(perturbed, lora.merge),
                               rtol=1e-5)
    jax.tree.map(lambda g, m: np.testing.assert_allclose(g, m, rtol=2e-3,
                                                         atol=2e-4 * np.abs(m).max()),
                 grad, merged_grad_fn(perturbed))


def test_attached_adapters_never_form_a_full_kernel_gradient():
    """The attached forward's gradient program holds no kernel-sized buffer of the frozen
    base: its largest gradient intermediate is far below the kernels' total size."""
    base = _random_params(CONFIG)
    adapters = _perturbed(lora.init_lora(base, CFG, jax.random.key(0)))
    x = _inputs(CONFIG)

    def loss(lora_params, join):
        params = join(base, lora_params, CFG)
        return jnp.sum(Flux(CONFIG).apply(
            {"params": params}, x["img"], x["img_ids"][None].repeat(B, 0), x["txt"],
            x["txt_ids"][None].repeat(B, 0), x["timesteps"], x["y"], x["guidance"]) ** 2)

    kernels = {tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(base).items()
               if k[-1] == "kernel" and k[0].startswith(("double", "single"))}

    def dot_output_shapes(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield tuple(eqn.outvars[0].aval.shape)
            for value in eqn.params.values():
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(item, "jaxpr", item)
                    if hasattr(inner, "eqns"):
                        yield from dot_output_shapes(inner)

    def kernel_shaped_outputs(join):
        jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, join=join)))(adapters)
        return sum(s in kernels for s in dot_output_shapes(jaxpr.jaxpr))

    assert kernel_shaped_outputs(lora.merge) > 0  # merging forms dL/dW' of every kernel
    assert kernel_shaped_outputs(lora.attach) == 0


def test_abstract_axes_and_shardings():
    abstract = abstract_params(CONFIG)
    boxed = lora.lora_abstract(abstract, CFG)
    axes = flax.traverse_util.flatten_dict(lora.lora_axes(abstract, CFG))
    assert tuple(axes[("double_blocks_0", "img_attn", "qkv", "lora_a")]) == ("embed", None)
    assert tuple(axes[("double_blocks_0", "img_attn", "qkv", "lora_b")]) == (
        None, None, "heads", "kv")
    assert tuple(axes[("double_blocks_0", "img_attn", "proj", "lora_a")]) == (
        "heads", "kv", None)
    assert tuple(axes[("single_blocks_0", "linear1", "mlp", "lora_b")]) == (None, "mlp")
    assert tuple(axes[("single_blocks_0", "linear2", "mlp", "lora_a")]) == ("mlp", None)
    real = lora.init_lora(nn.meta.unbox(abstract), CFG, jax.random.key(0))
    assert jax.tree.map(lambda a: a.shape, nn.meta.unbox(boxed)) == jax.tree.map(
        lambda a: a.shape, real)
    shardings = parallel.logical_shardings(boxed, parallel.make_mesh((1, 1, 1),
                                                                     jax.devices()[:1]))
    placed = jax.device_put(real, shardings)
    assert jax.tree.structure(placed) == jax.tree.structure(real)


def test_scan_blocks_adapters_are_the_stacked_per_block_ones():
    """A `scan_blocks` model's adapters: the stack of the per-block ones (init, axes), the
    same loss and gradient through `nn.scan`, the same merge; a target matching only some
    layers of a stack is an error."""
    config = tiny_config(depth=2, depth_single_blocks=1)
    scanned = dataclasses.replace(config, scan_blocks=True)
    base = _random_params(config)
    stacked_base = stack_blocks(base, config)
    init = lora.init_lora(base, CFG, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal,
                 lora.init_lora(stacked_base, CFG, jax.random.key(0)), stack_blocks(init, config))
    axes = flax.traverse_util.flatten_dict(lora.lora_axes(abstract_params(scanned), CFG))
    assert tuple(axes[("double_blocks", "block", "img_attn", "qkv", "lora_b")]) == (
        "layers", None, None, "heads", "kv")
    assert tuple(axes[("single_blocks", "block", "linear2", "attn", "lora_a")]) == (
        "layers", "heads", "kv", None)

    adapters = _perturbed(init)
    x = _inputs(config)

    def loss(model_config, params, lora_params):
        return jnp.sum(jnp.sin(_forward_traced(model_config, lora.attach(params, lora_params,
                                                                          CFG), x)))

    value, grad = jax.jit(jax.value_and_grad(functools.partial(loss, config, base)))(adapters)
    value_s, grad_s = jax.jit(jax.value_and_grad(functools.partial(loss, scanned,
                                                                   stacked_base)))(
        stack_blocks(adapters, config))
    np.testing.assert_allclose(value_s, value, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 grad_s, stack_blocks(grad, config))
    merged = lora.merge(stacked_base, stack_blocks(adapters, config), CFG)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 unstack_blocks(merged, config), lora.merge(base, adapters, CFG))
    with pytest.raises(ValueError, match="only some layers"):
        lora.init_lora(stacked_base, lora.lora_config(targets=[r"double_blocks_0/img_attn/qkv"]),
                       jax.random.key(0))


def _forward_traced(config, params, x):
    batched = lambda ids: jnp.broadcast_to(ids, (B,) + ids.shape)  # noqa: E731
    return Flux(config).apply({"params": params}, x["img"], batched(x["img_ids"]), x["txt"],
                              batched(x["txt_ids"]), x["timesteps"], x["y"], x["guidance"])


@pytest.mark.parametrize("overrides, match", [
    (dict(dropout=0.1), "dropout"),
    (dict(rank=0), "rank"),
    (dict(targets=[r"nothing/\d+"]), "match no kernel"),
    (dict(targets=["double_blocks_(\\d+"]), "not a valid regex"),
])
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        lora.init_lora(_random_params(CONFIG), lora.lora_config(**overrides), jax.random.key(0))
