"""T5 v1.1 encoder: parity with transformers' T5EncoderModel, loading, bf16, remat, errors."""

import dataclasses
import functools
import json
import os
import shutil

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from leapalign_jax.models.t5 import (T5_XXL, T5Encoder, abstract_t5_params,
                                     relative_position_bucket, tiny_t5_config)
from leapalign_jax.weights.t5 import load_t5, read_t5_config, t5_shapes

# Parity model: FLUX's bucket layout (32 buckets, max distance 128) and a sequence long
# enough (S > 128) to reach the exact, the log-spaced and the clamped buckets.
HF_CONFIG = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj="gated-gelu", dropout_rate=0.0)
B, S = 2, 150
RTOL = 1e-4


def _randomise(model, seed=0):
    """Every parameter random: norms around 1, the position table and embedding N(0, 1),
    Linear weights N(0, 1/fan_in), so each term of the maths moves the output."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * noise)
            elif "relative_attention_bias" in name or "shared" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[1]))
    return model


def _torch_encode(model, ids, mask=None):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=None if mask is None else torch.from_numpy(mask).long())
    return out.last_hidden_state.numpy() if hasattr(out, "last_hidden_state") else out[0].numpy()


@functools.lru_cache(maxsize=None)
def _jitted(config):
    return jax.jit(T5Encoder(config).apply)


def _encode(config, params, ids, mask=None):
    return np.asarray(_jitted(config)({"params": params}, ids, mask))


def _ids(seed=0, shape=(B, S), vocab=HF_CONFIG["vocab_size"]):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _errors(ours, ref):
    err = np.abs(ours - ref).max()
    return err, err / np.abs(ref).max()


@pytest.fixture(scope="module")
def hf_t5(tmp_path_factory):
    """A tiny random transformers T5EncoderModel, saved whole and sharded."""
    import torch
    from transformers import T5Config as HFT5Config, T5EncoderModel

    torch.manual_seed(0)
    model = _randomise(T5EncoderModel(HFT5Config(**HF_CONFIG)).eval())
    single = tmp_path_factory.mktemp("t5") / "text_encoder_2"
    sharded = tmp_path_factory.mktemp("t5_sharded") / "text_encoder_2"
    model.save_pretrained(single, safe_serialization=True)
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    return model, single, sharded


def _copy_with(src, dst, edit=None, config_edit=None):
    """A copy of a single-file folder, its tensors and config passed through the edits."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config_edit(config) if config_edit else config, f)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    save_file(edit(tensors) if edit else tensors, os.path.join(dst, "model.safetensors"))
    return dst


# ----------------------------------------------------------------------------- model


def test_config_presets_and_validation():
    assert (T5_XXL.d_model, T5_XXL.num_layers, T5_XXL.num_heads, T5_XXL.d_kv, T5_XXL.d_ff,
            T5_XXL.vocab_size) == (4096, 24, 64, 64, 10240, 32128)
    assert T5_XXL.dense_act_fn == "gelu_new" and T5_XXL.is_gated_act
    assert tiny_t5_config(num_layers=3).num_layers == 3
    for bad in (dict(dtype="float16"), dict(remat="some"), dict(dense_act_fn="swish"),
                dict(d_model=0), dict(relative_attention_num_buckets=7),
                dict(layer_norm_epsilon=0.0)):
        with pytest.raises(ValueError, match="^T5Config: [^\n]*$"):
            tiny_t5_config(**bad)


def test_xxl_shapes_and_logical_axes():
    """The XXL preset (shapes only) has exactly the checkpoint's tensors, 4.76B params."""
    abstract = abstract_t5_params(T5_XXL)
    shapes = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract))
    assert sum(int(np.prod(s.shape)) for s in shapes.values()) == sum(
        int(np.prod(s)) for s in t5_shapes(T5_XXL).values()) == 4_762_310_656
    specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(abstract))
    for path, spec in specs.items():
        assert len(spec) == shapes[path].ndim and any(n is not None for n in spec), path
    assert tuple(specs[("block_0", "attention", "q", "kernel")]) == ("embed", "heads")
    assert tuple(specs[("block_0", "attention", "o", "kernel")]) == ("heads", "embed")
    assert tuple(specs[("block_3", "mlp", "wi_1", "kernel")]) == ("embed", "mlp")
    assert tuple(specs[("block_3", "mlp", "wo", "kernel")]) == ("mlp", "embed")
    assert tuple(specs[("shared", "embedding")]) == ("vocab", "embed")


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20), (16, 50)])
def test_relative_position_bucket_matches_torch(buckets, max_distance):
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    offsets = np.arange(-300, 301)
    ref = T5Attention._relative_position_bucket(torch.from_numpy(offsets), True, buckets,
                                                max_distance).numpy()
    ours = np.asarray(relative_position_bucket(jnp.asarray(offsets), buckets, max_distance))
    np.testing.assert_array_equal(ours, ref)
    # Every bucket is reached but the positive one of offset 0 (0 counts as backward).
    assert set(ref) == set(range(buckets)) - {buckets // 2}


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_parity_with_transformers(hf_t5, layout):
    model, single, sharded = hf_t5
    folder = single if layout == "single" else sharded
    if layout == "sharded":
        assert os.path.isfile(folder / "model.safetensors.index.json")
        assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 1
    config, params = load_t5(folder)
    assert config == tiny_t5_config(**{k: v for k, v in HF_CONFIG.items()
                                       if k not in ("feed_forward_proj", "dropout_rate")})
    ids = _ids()
    ref = _torch_encode(model, ids)
    ours = _encode(config, params, ids)
    assert ours.shape == (B, S, HF_CONFIG["d_model"]) and ours.dtype == np.float32
    err, rel = _errors(ours, ref)
    print(f"T5 parity ({layout}): max abs {err:.2e}, relative {rel:.2e}")
    assert rel <= RTOL


def test_parity_with_attention_mask(hf_t5):
    model, single, _ = hf_t5
    config, params = load_t5(single)
    ids = _ids(1)
    mask = np.ones((B, S), np.int32)
    mask[0, 40:] = 0
    mask[1, 100:] = 0
    ref = _torch_encode(model, ids, mask)
    masked = _encode(config, params, ids, mask)
    err, rel = _errors(masked, ref)
    print(f"T5 parity with mask: max abs {err:.2e}, relative {rel:.2e}")
    assert rel <= RTOL
    # Without a mask (FLUX's call) the pads change the outputs of the real tokens.
    assert np.abs(_encode(config, params, ids)[0, :40] - masked[0, :40]).max() > 1e-2


def test_full_t5_checkpoint_skips_the_decoder(tmp_path):
    """A T5ForConditionalGeneration folder loads as its encoder; decoder tensors are skipped."""
    import torch
    from transformers import T5Config as HFT5Config, T5ForConditionalGeneration

    torch.manual_seed(1)
    model = _randomise(T5ForConditionalGeneration(HFT5Config(**HF_CONFIG)).eval(), seed=1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, params = load_t5(tmp_path)
    ids = _ids(2)
    err, rel = _errors(_encode(config, params, ids), _torch_encode(model.encoder, ids))
    assert rel <= RTOL


@pytest.mark.parametrize("names", [["encoder.embed_tokens.weight"],
                                   ["shared.weight", "encoder.embed_tokens.weight"]])
def test_embedding_under_either_key(hf_t5, tmp_path, names):
    model, single, _ = hf_t5

    def rename(tensors):
        embedding = tensors.pop("shared.weight")
        return {**tensors, **{name: embedding for name in names}}

    config, params = load_t5(_copy_with(single, tmp_path / "t5", rename))
    _, expected = load_t5(single)
    np.testing.assert_array_equal(params["shared"]["embedding"], expected["shared"]["embedding"])
    ids = _ids(3, (1, 20))
    assert _errors(_encode(config, params, ids), _torch_encode(model, ids))[1] <= RTOL


def test_bf16_weights_and_pipeline_folder(hf_t5, tmp_path):
    """A bf16 checkpoint (FLUX's text_encoder_2 dtype) found from its pipeline folder."""
    _, single, _ = hf_t5
    pipeline = tmp_path / "flux"
    _copy_with(single, pipeline / "text_encoder_2",
               lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
    config, params = load_t5(pipeline)
    _, ref = load_t5(single)
    leaves = jax.tree.leaves(params)
    assert {leaf.dtype for leaf in leaves} == {np.dtype(np.float32)}
    for a, b in zip(leaves, jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=2 ** -8, atol=1e-6)
    _, half = load_t5(pipeline, dtype=ml_dtypes.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(half)} == {np.dtype(ml_dtypes.bfloat16)}


# ----------------------------------------------------------------------------- bf16, remat


def test_bf16_compute_close_to_fp32(hf_t5):
    """FLUX's 512-token input in bf16: finite, float32 out, close to the fp32 result."""
    _, single, _ = hf_t5
    config, params = load_t5(single)
    ids = _ids(4, (B, 512))
    ref = _encode(config, params, ids)
    out = _encode(dataclasses.replace(config, dtype="bfloat16"), params, ids)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    err, rel = _errors(out, ref)
    print(f"T5 bf16 vs fp32 (S=512): max abs {err:.2e}, relative {rel:.2e}")
    assert rel <= 3e-2


def test_remat_same_output_and_gradient(hf_t5):
    _, single, _ = hf_t5
    config, params = load_t5(single)
    ids = _ids(5, (1, 24))

    def loss(config, params):
        return jnp.sum(T5Encoder(config).apply({"params": params}, ids) ** 2)

    ref_loss, ref_grad = jax.jit(jax.value_and_grad(functools.partial(loss, config)))(params)
    for remat in ("full", "dots_saveable"):
        got_loss, got_grad = jax.jit(jax.value_and_grad(
            functools.partial(loss, dataclasses.replace(config, remat=remat))))(params)
        np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


# ----------------------------------------------------------------------------- errors


def test_missing_folder_config_and_weights(hf_t5, tmp_path):
    with pytest.raises(FileNotFoundError, match="T5 encoder folder not found"):
        load_t5(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="^no config.json in .*text_encoder_2/\\)"):
        load_t5(tmp_path)
    shutil.copy(hf_t5[1] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        load_t5(tmp_path)


def test_wrong_model_family(tmp_path):
    clip = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "hidden_size": 768}
    (tmp_path / "config.json").write_text(json.dumps(clip))
    with pytest.raises(ValueError, match="^[^\n]*config.json: model_type is 'clip_text_model', "
                                         "not 't5' [^\n]*pass the T5 encoder folder [^\n]*$"):
        read_t5_config(tmp_path)
    odd = {"architectures": ["BertModel"], "model_type": "t5"}
    (tmp_path / "config.json").write_text(json.dumps(odd))
    with pytest.raises(ValueError, match="not T5 models"):
        read_t5_config(tmp_path)
    bad_ff = {"model_type": "t5", "feed_forward_proj": "gelu-gated"}
    (tmp_path / "config.json").write_text(json.dumps(bad_ff))
    with pytest.raises(ValueError, match="feed_forward_proj"):
        read_t5_config(tmp_path)
    bad_value = {"model_type": "t5", "num_heads": 0}
    (tmp_path / "config.json").write_text(json.dumps(bad_value))
    with pytest.raises(ValueError, match="config.json: T5Config: num_heads"):
        read_t5_config(tmp_path)


def test_relu_t5_v1_config(tmp_path):
    """Original T5 (feed_forward_proj "relu"): a plain `wi` feed-forward."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    config = read_t5_config(tmp_path)
    assert (config.dense_act_fn, config.is_gated_act, config.d_model) == ("relu", False, 512)
    assert "encoder.block.0.layer.1.DenseReluDense.wi.weight" in t5_shapes(config)


_Q = "encoder.block.1.layer.0.SelfAttention.q.weight"
_WO = "encoder.block.0.layer.1.DenseReluDense.wo.weight"


@pytest.mark.parametrize("edit,expected", [
    (lambda t: {k: v for k, v in t.items() if k != _WO}, f"missing {_WO}"),
    (lambda t: {**t, _Q: t[_Q][:, :-1]}, f"wrong shape {_Q}: expected (32, 32), found (32, 31)"),
    (lambda t: {**t, "encoder.block.0.layer.0.SelfAttention.extra.weight": t[_Q]},
     "unexpected encoder.block.0.layer.0.SelfAttention.extra.weight"),
    (lambda t: {k: v for k, v in t.items() if k != "shared.weight"}, "missing shared.weight"),
    (lambda t: {**t, "encoder.embed_tokens.weight": t["shared.weight"][:-1]},
     "wrong shape encoder.embed_tokens.weight"),
], ids=["missing", "misshaped", "unexpected", "no-embedding", "misshaped-alias"])
def test_bad_tensors_one_error(hf_t5, tmp_path, edit, expected):
    folder = _copy_with(hf_t5[1], tmp_path / "text_encoder_2", edit)
    with pytest.raises(ValueError) as info:
        load_t5(folder)
    first, *rest = str(info.value).splitlines()
    assert first.startswith(str(folder)) and "text_encoder_2/" in first, first
    assert "tensor(s) do not fit T5Encoder(d_model 32" in first
    assert [line.strip() for line in rest if expected in line], str(info.value)
