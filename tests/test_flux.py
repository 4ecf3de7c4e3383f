"""Flux MMDiT: parity with diffusers, BFL/diffusers weight loading, bf16, remat, errors."""

import dataclasses
import functools
import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from leapalign_jax.models.flux import (FLUX_DEV, FLUX_SCHNELL, Flux, FluxConfig, abstract_params,
                                       stack_blocks, tiny_config, unstack_blocks)
from leapalign_jax.weights.flux import bfl_shapes, load_flux, read_flux_config, save_flux_bfl

B, H, W, S = 2, 3, 4, 5  # batch, latent rows, latent cols, text tokens


def _inputs(config, rng, random_ids=False):
    """Flux-style inputs: text ids zero, image ids (0, row, col); or random integer ids."""
    img_ids = np.zeros((H, W, 3), np.float32)
    img_ids[..., 1], img_ids[..., 2] = np.arange(H)[:, None], np.arange(W)[None]
    img_ids, txt_ids = img_ids.reshape(-1, 3), np.zeros((S, 3), np.float32)
    if random_ids:
        img_ids = rng.integers(0, 50, img_ids.shape).astype(np.float32)
        txt_ids = rng.integers(0, 50, txt_ids.shape).astype(np.float32)
    return dict(
        img=rng.standard_normal((B, H * W, config.in_channels), dtype=np.float32),
        img_ids=img_ids, txt=rng.standard_normal((B, S, config.context_in_dim), dtype=np.float32),
        txt_ids=txt_ids, timesteps=np.array([0.3, 0.9], np.float32),
        y=rng.standard_normal((B, config.vec_in_dim), dtype=np.float32),
        guidance=np.array([3.5, 1.0], np.float32) if config.guidance_embed else None)


@functools.lru_cache(maxsize=None)
def _jitted_apply(config):
    return jax.jit(Flux(config).apply)


def _apply(config, params, x):
    batched = lambda ids: np.broadcast_to(ids, (B,) + ids.shape)  # noqa: E731
    return _jitted_apply(config)({"params": params}, x["img"], batched(x["img_ids"]), x["txt"],
                                 batched(x["txt_ids"]), x["timesteps"], x["y"], x["guidance"])


def _torch_forward(model, x):
    import torch

    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    with torch.no_grad():
        return model(t(x["img"]), t(x["txt"]), t(x["y"]), t(x["timesteps"]), t(x["img_ids"]),
                     t(x["txt_ids"]), t(x["guidance"])).sample.numpy()


def _abstract_params(config):
    x = _inputs(config, np.random.default_rng(0))
    return jax.eval_shape(Flux(config).init, jax.random.key(0), x["img"], x["img_ids"][None],
                          x["txt"], x["txt_ids"][None], x["timesteps"], x["y"],
                          x["guidance"])["params"]


def _random_params(config, seed=0, std=0.3):
    """Random params with no zero or unit layers, so every term of the maths matters."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: (rng.standard_normal(p.shape, dtype=np.float32) * std
                   / np.sqrt(p.shape[0] if p.ndim == 2 else 1)),
        nn.meta.unbox(_abstract_params(config)))


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def diffusers_flux(request, tmp_path_factory):
    """A tiny random diffusers FluxTransformer2DModel saved to disk (sharded for schnell)."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=request.param, axes_dims_rope=(4, 6, 6)).eval()
    with torch.no_grad():  # randomise everything, zero-initialised and norm layers included
        for p in model.parameters():
            p.normal_(0.0, 0.3 / np.sqrt(p.shape[1]) if p.ndim == 2 else 0.3)
    folder = tmp_path_factory.mktemp("diffusers") / "transformer"
    model.save_pretrained(folder, **({} if request.param else {"max_shard_size": "20KB"}))
    return model, folder


# ----------------------------------------------------------------------------- model


def test_config_presets_and_validation():
    assert FLUX_DEV.head_dim == 128 and FLUX_DEV.out_channels == 64 and FLUX_DEV.guidance_embed
    assert not FLUX_SCHNELL.guidance_embed
    assert FluxConfig(axes_dim=[16, 56, 56]) == FLUX_DEV  # lists from JSON compare equal
    for bad in (dict(num_heads=5), dict(axes_dim=(16, 56, 48)), dict(dtype="float16"),
                dict(remat="some")):
        with pytest.raises(ValueError, match="FluxConfig"):
            FluxConfig(**bad)


def test_logical_axis_names():
    abstract = _abstract_params(tiny_config())
    specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(abstract))
    shapes = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract))
    assert set(specs) == set(shapes)
    for path, spec in specs.items():
        assert len(spec) == len(shapes[path].shape), path
        assert set(spec) <= {"embed", "mlp", "heads", "kv", None}, (path, spec)
        if path[-1] == "kernel":
            assert any(name is not None for name in spec), path
    qkv, out = ("embed", None, "heads", "kv"), ("heads", "kv", "embed")
    for path, axes, shape in [
            (("double_blocks_0", "img_attn", "qkv", "kernel"), qkv, (32, 3, 2, 16)),
            (("double_blocks_0", "img_attn", "qkv", "bias"), qkv[1:], (3, 2, 16)),
            (("double_blocks_0", "txt_attn", "proj", "kernel"), out, (2, 16, 32)),
            (("single_blocks_0", "linear1", "qkv", "kernel"), qkv, (32, 3, 2, 16)),
            (("single_blocks_0", "linear1", "mlp", "kernel"), ("embed", "mlp"), (32, 128)),
            (("single_blocks_0", "linear2", "attn", "kernel"), out, (2, 16, 32)),
            (("single_blocks_0", "linear2", "mlp", "kernel"), ("mlp", "embed"), (128, 32)),
            (("single_blocks_0", "linear2", "mlp", "bias"), ("embed",), (32,)),
            (("final_layer", "linear", "kernel"), ("embed", None), (32, 16))]:
        assert tuple(specs[path]) == axes and shapes[path].shape == shape, path
    assert ("single_blocks_0", "linear2", "attn", "bias") not in specs


def test_guidance_argument_is_checked():
    config = tiny_config()
    params = _random_params(config)
    x = _inputs(config, np.random.default_rng(0))
    with pytest.raises(ValueError, match="guidance"):
        _apply(config, params, dict(x, guidance=None))
    with pytest.raises(ValueError, match="guidance"):
        _apply(dataclasses.replace(config, guidance_embed=False),
               {k: v for k, v in params.items() if k != "guidance_in"}, x)


def test_bf16_compute_close_to_fp32():
    config = tiny_config()
    params = _random_params(config)
    x = _inputs(config, np.random.default_rng(1))
    ref = np.asarray(_apply(config, params, x))
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    assert {p.dtype for p in jax.tree.leaves(nn.meta.unbox(_abstract_params(bf16)))} == {
        jnp.dtype(jnp.float32)}
    out = _apply(bf16, params, x)
    assert out.dtype == jnp.float32
    rel = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
    assert 0 < rel < 5e-2, rel


def test_remat_same_output_and_gradient():
    config = tiny_config()
    params = _random_params(config)
    x = _inputs(config, np.random.default_rng(2))

    def loss(p, remat):
        return jnp.sum(jnp.sin(_apply(dataclasses.replace(config, remat=remat), p, x)))

    value, grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "none")
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad)) > 0
    for remat in ("full", "dots_saveable", "offload"):
        value_r, grad_r = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, remat)
        np.testing.assert_allclose(value_r, value, rtol=1e-5)
        for g, g_r in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_r)):
            np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-6)


def test_scanned_blocks_equal_the_unrolled_model():
    """`scan_blocks`: stacked params, the same output and gradient, "layers" axis names,
    and a program with one block of each kind instead of depth of them."""
    config = tiny_config(depth=3, depth_single_blocks=2, remat="full")
    scanned = dataclasses.replace(config, scan_blocks=True)
    params = jax.tree.map(jnp.asarray, _random_params(config))
    stacked = stack_blocks(params, config)
    assert jax.tree.structure(stacked) == jax.tree.structure(
        nn.meta.unbox(abstract_params(scanned)))
    jax.tree.map(np.testing.assert_array_equal, unstack_blocks(stacked, config), params)
    spec = nn.get_partition_spec(abstract_params(scanned))
    assert spec["double_blocks"]["block"]["img_attn"]["qkv"]["kernel"] == \
        jax.sharding.PartitionSpec("layers", "embed", None, "heads", "kv")
    x = _inputs(config, np.random.default_rng(3))

    def loss(p, cfg):
        return jnp.sum(jnp.sin(_apply(cfg, p, x)))

    value, grad = jax.value_and_grad(loss)(params, config)
    value_s, grad_s = jax.value_and_grad(loss)(stacked, scanned)
    np.testing.assert_allclose(value_s, value, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 unstack_blocks(grad_s, config), grad)

    def dots(cfg, p):
        text = jax.jit(functools.partial(loss, cfg=cfg)).lower(p).as_text()
        return text.count("dot_general")

    assert dots(scanned, stacked) < dots(config, params) / 2


# ----------------------------------------------------------------------------- parity


def test_diffusers_parity(diffusers_flux):
    model, folder = diffusers_flux
    config, params = load_flux(folder)
    assert config == tiny_config(depth=2, depth_single_blocks=2,
                                 guidance_embed=model.config.guidance_embeds)
    rng = np.random.default_rng(0)
    for random_ids in (False, True):
        x = _inputs(config, rng, random_ids)
        ref = _torch_forward(model, x)
        out = np.asarray(_apply(config, params, x))
        assert np.abs(ref).max() > 0.1
        assert np.abs(out - ref).max() < 1e-4, (random_ids, np.abs(out - ref).max())


def test_bfl_file_round_trip(diffusers_flux, tmp_path):
    model, folder = diffusers_flux
    config, params = load_flux(folder.parent)  # the pipeline folder holding transformer/
    path = tmp_path / "flux.safetensors"
    save_flux_bfl(path, config, params)
    config_bfl, params_bfl = load_flux(path, axes_dim=(4, 6, 6))
    assert config_bfl == config
    jax.tree.map(np.testing.assert_array_equal, params_bfl, params)
    x = _inputs(config, np.random.default_rng(3))
    assert np.abs(np.asarray(_apply(config, params_bfl, x)) - _torch_forward(model, x)).max() < 1e-4


def _write_header_only(path, shapes):
    """A bf16 safetensors file with real-size tensors stored sparsely (all zeros, no disk)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[key] = {"dtype": "BF16", "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)


def test_flux_dev_shaped_file_infers_config(tmp_path):
    dev = dataclasses.replace(FLUX_DEV, depth=1, depth_single_blocks=1)
    path = tmp_path / "flux1-dev.safetensors"
    _write_header_only(path, bfl_shapes(dev))
    config, params = load_flux(path, dtype=ml_dtypes.bfloat16)
    assert config == dev
    qkv = params["double_blocks_0"]["img_attn"]["qkv"]["kernel"]
    assert qkv.shape == (3072, 3, 24, 128) and qkv.dtype == ml_dtypes.bfloat16
    assert params["single_blocks_0"]["linear1"]["qkv"]["kernel"].shape == (3072, 3, 24, 128)
    assert params["single_blocks_0"]["linear1"]["mlp"]["kernel"].shape == (3072, 12288)
    assert params["single_blocks_0"]["linear2"]["attn"]["kernel"].shape == (24, 128, 3072)
    assert params["txt_in"]["kernel"].shape == (4096, 3072)
    assert bfl_shapes(dev)["single_blocks.0.linear1.weight"] == (3 * 3072 + 12288, 3072)
    assert bfl_shapes(dev)["single_blocks.0.linear2.weight"] == (3072, 3072 + 12288)

    schnell = dataclasses.replace(FLUX_SCHNELL, depth=1, depth_single_blocks=1)
    _write_header_only(tmp_path / "schnell.safetensors", bfl_shapes(schnell))
    assert read_flux_config(tmp_path / "schnell.safetensors") == schnell


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def bfl_tensors():
    config = tiny_config()
    return config, {key: np.zeros(shape, np.float32) for key, shape in bfl_shapes(config).items()}


@pytest.mark.parametrize("edit, key", [
    ("missing", "double_blocks.0.txt_attn.proj.weight"),
    ("extra", "double_blocks.0.img_attn.lora_down.weight"),
    ("shape", "single_blocks.0.linear2.weight"),
])
def test_bad_tensors_give_one_error_naming_the_key(bfl_tensors, tmp_path, edit, key):
    from safetensors.numpy import save_file

    _, tensors = bfl_tensors
    tensors = dict(tensors)
    if edit == "missing":
        del tensors[key]
    elif edit == "extra":
        tensors[key] = np.zeros((4, 32), np.float32)
    else:
        tensors[key] = np.zeros((32, 100), np.float32)
    tensors["txt_in.bias"] = np.zeros((31,), np.float32)  # a second problem, same message
    save_file(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError) as err:
        load_flux(tmp_path / "bad.safetensors", axes_dim=(4, 6, 6))
    message = str(err.value)
    assert key in message and "txt_in.bias" in message and "bad.safetensors" in message
    if edit == "shape":
        assert "(32, 160)" in message and "(32, 100)" in message


def test_diffusers_missing_tensor(diffusers_flux, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, folder = diffusers_flux
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        tensors.update(load_file(shard))
    del tensors["single_transformer_blocks.1.proj_mlp.bias"]
    (tmp_path / "t").mkdir()
    save_file(tensors, tmp_path / "t" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "t" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing single_transformer_blocks\.1\.proj_mlp\.bias"):
        load_flux(tmp_path / "t")


def test_truncated_and_missing_files(bfl_tensors, tmp_path):
    from safetensors.numpy import save_file

    _, tensors = bfl_tensors
    good = tmp_path / "good.safetensors"
    save_file(tensors, good)
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_flux(tmp_path / "cut.safetensors", axes_dim=(4, 6, 6))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_flux(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_flux(tmp_path)  # a folder, but not a diffusers one
    with pytest.raises(ValueError, match="axes_dim"):
        load_flux(good)  # head dim 16: axes_dim cannot be inferred
