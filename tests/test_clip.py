"""CLIP text / vision towers: parity with transformers' torch CLIP, loaders, errors.

Tiny random models (every parameter randomised, norms and embeddings included) are saved
with `save_pretrained(safe_serialization=True)`, loaded with our loaders and compared in
float32. Relative errors are max|ours - torch| / max|torch|.
"""

import dataclasses
import functools
import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leapalign_jax.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel,
                                       CLIPVisionConfig, CLIPVisionModel, abstract_params)
from leapalign_jax.weights.clip import load_clip, load_clip_text, load_clip_vision
from clip_random import randomise_clip

VOCAB, SEQ, IMAGE, PROJ = 64, 10, 16, 24
TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             layer_norm_eps=1e-5)
TEXT_HF = dict(TOWER, vocab_size=VOCAB, max_position_embeddings=12, hidden_act="quick_gelu",
               bos_token_id=VOCAB - 2, pad_token_id=0)
VISION_HF = dict(TOWER, image_size=IMAGE, patch_size=4, num_channels=3, hidden_act="gelu")


def _rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _text_ids(rng, eos, eos_is_max):
    """(3, SEQ) ids: BOS, prompt tokens, EOS at varying positions, then padding.

    With `eos_is_max` the EOS id is the largest (OpenAI's 49407) and rows are padded with
    EOS; otherwise tokens above the EOS id follow it, so argmax(ids) != first EOS.
    """
    ids = rng.integers(3, VOCAB - 2, (3, SEQ))
    ids[ids == eos] = eos + 1  # EOS only where placed below
    ids[:, 0] = VOCAB - 2
    for row, length in enumerate((4, 7, SEQ - 1)):
        ids[row, length] = eos
        ids[row, length + 1:] = eos if eos_is_max else VOCAB - 1
    return ids


@functools.lru_cache(maxsize=None)
def _jit(module, method=None):
    return jax.jit(functools.partial(module.apply, method=method))


def _torch_layout_v4(folder, prefix, buffers):
    """Rewrites a transformers-5 save of a plain tower into the transformers-4 layout (keys
    under `prefix`, int64 `position_ids` buffer stored), like FLUX's text_encoder/."""
    from safetensors.numpy import load_file, save_file

    file = os.path.join(folder, "model.safetensors")
    tensors = {prefix + k: v for k, v in load_file(file).items()}
    for key, n in buffers.items():
        tensors[prefix + key] = np.arange(n, dtype=np.int64)[None]
    save_file(tensors, file, metadata={"format": "pt"})


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def text_folders(tmp_path_factory):
    """{"legacy": (pipeline folder, torch model), "eos": (...)}: eos_token_id 2 (argmax
    pooling, transformers-4 layout under text_encoder/) and a real EOS id (first-EOS
    pooling, transformers-5 layout, sharded)."""
    from transformers import CLIPTextConfig as HFConfig, CLIPTextModel as HFModel

    out = {}
    for i, (name, eos) in enumerate((("legacy", 2), ("eos", 40))):
        model = randomise_clip(HFModel(HFConfig(**TEXT_HF, eos_token_id=eos,
                                            attn_implementation="eager")), seed=i)
        root = tmp_path_factory.mktemp(f"text_{name}")
        if name == "legacy":
            folder = os.path.join(root, "text_encoder")
            model.save_pretrained(folder, safe_serialization=True)
            _torch_layout_v4(folder, "text_model.", {"embeddings.position_ids": 12})
        else:
            model.save_pretrained(root, safe_serialization=True, max_shard_size="30KB")
        out[name] = (str(root), model)
    return out


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory):
    from transformers import CLIPVisionConfig as HFConfig
    from transformers import CLIPVisionModelWithProjection as HFModel

    model = randomise_clip(HFModel(HFConfig(**VISION_HF, projection_dim=PROJ,
                                        attn_implementation="eager")), seed=3)
    folder = tmp_path_factory.mktemp("vision")
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder), model


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig as HFConfig, CLIPModel as HFModel

    config = HFConfig(text_config=dict(TEXT_HF, eos_token_id=VOCAB - 1),
                      vision_config=dict(VISION_HF, hidden_act="quick_gelu", hidden_size=40,
                                         num_attention_heads=5),
                      projection_dim=PROJ, attn_implementation="eager")
    model = randomise_clip(HFModel(config), seed=4)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder), model


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize("name", ["legacy", "eos"])
def test_text_parity(text_folders, name):
    import torch

    folder, torch_model = text_folders[name]
    config, params = load_clip_text(folder)
    eos = torch_model.config.eos_token_id
    assert config.eos_token_id == eos and config.projection_dim is None
    assert config.hidden_act == "quick_gelu" and config.num_layers == 2
    ids = _text_ids(np.random.default_rng(0), VOCAB - 1 if eos == 2 else eos, eos == 2)
    if eos != 2:  # the two pooling rules must disagree for this test to mean anything
        assert (ids.argmax(-1) != (ids == eos).argmax(-1)).all()

    last, pooled = _jit(CLIPTextModel(config))({"params": params}, jnp.asarray(ids))
    with torch.no_grad():
        ref = torch_model(input_ids=torch.from_numpy(ids))
    err_last = _rel(last, ref.last_hidden_state.numpy())
    err_pooled = _rel(pooled, ref.pooler_output.numpy())
    print(f"\ntext[{name}] rel err: last_hidden_state {err_last:.2e}, pooled {err_pooled:.2e}")
    assert err_last < 1e-4 and err_pooled < 1e-4


@pytest.mark.parametrize("name", ["legacy", "eos"])
def test_pooled_same_for_eos_and_zero_padding(text_folders, name):
    """OpenAI pads with EOS, OpenCLIP with 0: the causal mask makes pooled identical."""
    config, params = load_clip_text(text_folders[name][0])
    eos = VOCAB - 1 if config.eos_token_id == 2 else config.eos_token_id
    ids = _text_ids(np.random.default_rng(1), eos, eos_is_max=True)  # padded with EOS
    zero = ids.copy()
    for row in range(len(ids)):
        first = int(np.argmax(ids[row] == eos))
        zero[row, first + 1:] = 0
    apply = _jit(CLIPTextModel(config))
    last_eos, pooled_eos = apply({"params": params}, jnp.asarray(ids))
    last_zero, pooled_zero = apply({"params": params}, jnp.asarray(zero))
    assert not np.allclose(last_eos, last_zero)  # the paddings do differ after EOS
    np.testing.assert_allclose(pooled_eos, pooled_zero, rtol=0, atol=1e-6)


def test_text_bf16_and_remat(text_folders):
    config, params = load_clip_text(text_folders["eos"][0])
    ids = jnp.asarray(_text_ids(np.random.default_rng(2), 40, False))
    last, pooled = _jit(CLIPTextModel(config))({"params": params}, ids)
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    last16, pooled16 = _jit(CLIPTextModel(bf16))({"params": params}, ids)
    assert last16.dtype == jnp.float32 and _rel(pooled16, pooled) < 5e-2
    remat = dataclasses.replace(config, remat="full")
    _, pooled_r = _jit(CLIPTextModel(remat))({"params": params}, ids)
    np.testing.assert_allclose(pooled_r, pooled, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- vision


def _pixels(seed, config):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, config.image_size, config.image_size, 3), dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _vision_run(config):
    """One jitted (params, pixels, w) -> (last_hidden_state, pooled, image_embeds,
    d sum(image_embeds * w) / d pixels), so each config compiles once."""
    def outputs(module, pixels):
        last, pooled = module(pixels)
        return last, pooled, module.visual_projection(pooled).astype(jnp.float32)

    def run(params, pixels, w):
        (last, pooled, embeds), vjp = jax.vjp(lambda x: CLIPVisionModel(config).apply(
            {"params": params}, x, method=outputs), pixels)
        return last, pooled, embeds, vjp((jnp.zeros_like(last), jnp.zeros_like(pooled), w))[0]

    return jax.jit(run)


def test_vision_parity_and_pixel_gradient(vision_folder):
    import torch

    folder, torch_model = vision_folder
    config, params = load_clip_vision(folder)
    assert config.hidden_act == "gelu" and config.projection_dim == PROJ
    pixels = _pixels(0, config)
    weights = np.random.default_rng(1).standard_normal((2, PROJ), dtype=np.float32)
    last, pooled, embeds, grad = _vision_run(config)(params, pixels, weights)

    x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    ref = torch_model(pixel_values=x)
    (ref.image_embeds * torch.from_numpy(weights)).sum().backward()
    ref_grad = x.grad.numpy().transpose(0, 2, 3, 1)
    with torch.no_grad():
        ref_pooled = torch_model.vision_model(pixel_values=x).pooler_output.numpy()
    errs = dict(last_hidden_state=_rel(last, ref.last_hidden_state.detach().numpy()),
                pooled=_rel(pooled, ref_pooled),
                image_embeds=_rel(embeds, ref.image_embeds.detach().numpy()),
                pixel_grad=_rel(grad, ref_grad))
    print("\nvision rel err: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs["last_hidden_state"], errs["pooled"], errs["image_embeds"]) < 1e-4
    assert errs["pixel_grad"] < 1e-3


def test_vision_bf16_and_remat(vision_folder):
    config, params = load_clip_vision(vision_folder[0])
    pixels = _pixels(0, config)
    weights = np.random.default_rng(1).standard_normal((2, PROJ), dtype=np.float32)
    _, _, embeds, grad = _vision_run(config)(params, pixels, weights)
    remat = dataclasses.replace(config, remat="dots_saveable")
    _, _, embeds_r, grad_r = _vision_run(remat)(params, pixels, weights)
    np.testing.assert_allclose(embeds_r, embeds, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_r, grad, rtol=1e-5, atol=1e-6)
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    _, pooled16, embeds16, grad16 = _vision_run(bf16)(params, pixels, weights)
    assert pooled16.dtype == embeds16.dtype == grad16.dtype == jnp.float32
    print(f"\nvision bf16 vs fp32 rel err: image_embeds {_rel(embeds16, embeds):.2e}, "
          f"pixel_grad {_rel(grad16, grad):.2e}")
    assert _rel(embeds16, embeds) < 5e-2 and _rel(grad16, grad) < 1e-1


# ----------------------------------------------------------------------------- CLIPModel


def test_clip_model_parity(clip_folder):
    import torch

    folder, torch_model = clip_folder
    config, params = load_clip(folder)
    assert config.projection_dim == PROJ and config.vision.hidden_size == 40
    assert set(params) == {"text_model", "vision_model", "logit_scale"}
    ids = _text_ids(np.random.default_rng(3), VOCAB - 1, eos_is_max=True)
    pixels = _pixels(4, config.vision)
    model = CLIPModel(config)
    out = _jit(model)({"params": params}, jnp.asarray(ids), pixels)
    # The tower's subtree serves the standalone module too.
    text_features = _jit(CLIPTextModel(config.text), CLIPTextModel.get_text_features)(
        {"params": params["text_model"]}, ids)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.from_numpy(ids),
                          pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
        ref_text = torch_model.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output
    errs = dict(text_embeds=_rel(out.text_embeds, ref.text_embeds.numpy()),
                image_embeds=_rel(out.image_embeds, ref.image_embeds.numpy()),
                logits_per_text=_rel(out.logits_per_text, ref.logits_per_text.numpy()),
                text_features=_rel(text_features, ref_text.numpy()))
    print("\nCLIPModel rel err: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) < 1e-4
    assert float(out.logit_scale) == pytest.approx(torch_model.logit_scale.item(), abs=1e-7)


# ----------------------------------------------------------------------------- structure


def test_logical_axis_names_and_float32_params():
    text = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=1,
                          num_heads=4, max_position_embeddings=8, projection_dim=PROJ)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                              image_size=8, patch_size=4, projection_dim=PROJ,
                              dtype="bfloat16")
    abstract = abstract_params(CLIPConfig(text, vision))
    flat = flax.traverse_util.flatten_dict(abstract)
    for path, leaf in flat.items():
        if path[-1] in ("kernel", "embedding", "class_embedding"):
            assert isinstance(leaf, nn.Partitioned), path
            assert any(n is not None for n in leaf.names), path
        assert nn.meta.unbox(leaf).dtype == jnp.float32, path
    assert flat[("text_model", "embeddings", "token_embedding", "embedding")].names == (
        "vocab", "embed")
    assert flat[("vision_model", "embeddings", "patch_embedding", "kernel")].names[-1] == "embed"


@pytest.mark.parametrize("make, match", [
    (lambda: CLIPTextConfig(hidden_size=30, num_heads=4), "divisible by num_heads"),
    (lambda: CLIPTextConfig(hidden_act="gelu_new"), "unknown hidden_act"),
    (lambda: CLIPTextConfig(vocab_size=10, eos_token_id=49407), "outside the vocabulary"),
    (lambda: CLIPVisionConfig(image_size=20, patch_size=14), "multiple of patch_size"),
    (lambda: CLIPVisionConfig(dtype="float16"), "unknown dtype"),
    (lambda: CLIPVisionConfig(remat="some"), "unknown remat"),
    (lambda: CLIPConfig(CLIPTextConfig(projection_dim=8), CLIPVisionConfig(projection_dim=9)),
     "projection_dim must be equal"),
])
def test_config_validation(make, match):
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_input_shape_errors():
    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=8, num_layers=0,
                            num_heads=2, max_position_embeddings=4, eos_token_id=5)
    with pytest.raises(ValueError, match="S <= 4"):
        CLIPTextModel(config).init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_layers=0, num_heads=2,
                              image_size=8, patch_size=4)
    with pytest.raises(ValueError, match="channels-last"):
        CLIPVisionModel(vision).init(jax.random.key(0), jnp.zeros((1, 3, 8, 8)))


# ----------------------------------------------------------------------------- bad folders


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_wrong_model_type(text_folders, clip_folder, tmp_path):
    t5 = tmp_path / "text_encoder_2"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32}))
    with pytest.raises(ValueError, match=r"model_type 't5' .*text_encoder_2") as err:
        load_clip_text(t5)
    assert "\n" not in str(err.value) and str(t5) in str(err.value)
    with pytest.raises(ValueError, match="use load_clip_text"):
        load_clip(os.path.join(text_folders["legacy"][0], "text_encoder"))
    with pytest.raises(ValueError, match="use load_clip$"):
        load_clip_text(clip_folder[0])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_clip_text(tmp_path)


def _edit_tensors(folder, edit):
    from safetensors.numpy import load_file, save_file

    file = os.path.join(folder, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("edit, expect", [
    (lambda t: t.pop("text_model.encoder.layers.1.mlp.fc1.bias"),
     "missing text_model.encoder.layers.1.mlp.fc1.bias"),
    (lambda t: t.update({"visual_projection.weight": np.zeros((PROJ, 7), np.float32)}),
     "wrong shape visual_projection.weight: expected (24, 40), found (24, 7)"),
    (lambda t: t.update({"text_model.embeddings.extra": np.zeros(3, np.float32)}),
     "unexpected text_model.embeddings.extra"),
])
def test_bad_tensors(clip_folder, tmp_path, edit, expect):
    folder = _copy(clip_folder[0], tmp_path / "clip")
    _edit_tensors(folder, edit)
    with pytest.raises(ValueError) as err:
        load_clip(folder)
    first, *rest = str(err.value).split("\n")
    assert first.startswith(folder) and "do not fit CLIPModel" in first
    assert len(rest) == 1 and rest[0].startswith("  " + expect)


def test_position_ids_buffers_tolerated(clip_folder, tmp_path):
    folder = _copy(clip_folder[0], tmp_path / "clip")
    _edit_tensors(folder, lambda t: t.update({
        "text_model.embeddings.position_ids": np.arange(12, dtype=np.int64)[None],
        "vision_model.embeddings.position_ids": np.arange(17, dtype=np.int64)[None]}))
    config, params = load_clip(folder)
    assert params["logit_scale"].shape == ()


def test_missing_weights_file(vision_folder, tmp_path):
    folder = _copy(vision_folder[0], tmp_path / "vision")
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_clip_vision(folder)


def test_config_json_matches_transformers(tmp_path):
    """Defaults, legacy `*_config_dict` and projections are read as transformers reads them."""
    from transformers import CLIPConfig as HFConfig

    from leapalign_jax.weights.clip import read_clip_config

    cfg = {"model_type": "clip", "projection_dim": 16, "logit_scale_init_value": 3.0,
           "text_config": {"hidden_size": 64, "eos_token_id": 2, "vocab_size": 100},
           "text_config_dict": {"hidden_size": 96, "num_attention_heads": 4},
           "vision_config": {"hidden_size": 48, "num_attention_heads": 4, "patch_size": 16,
                             "hidden_act": "gelu"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours, ref = read_clip_config(tmp_path), HFConfig.from_pretrained(tmp_path)
    for mine, theirs in ((ours.text, ref.text_config), (ours.vision, ref.vision_config)):
        for field, hf in (("hidden_size", "hidden_size"), ("num_heads", "num_attention_heads"),
                          ("num_layers", "num_hidden_layers"), ("hidden_act", "hidden_act"),
                          ("intermediate_size", "intermediate_size")):
            assert getattr(mine, field) == getattr(theirs, hf), field
        assert mine.projection_dim == ref.projection_dim == 16
    assert ours.text.eos_token_id == ref.text_config.eos_token_id
    assert ours.text.vocab_size == ref.text_config.vocab_size
    assert ours.vision.patch_size == ref.vision_config.patch_size == 16
    assert ours.logit_scale_init == 3.0


def test_with_projection_text_and_plain_vision_folders(tmp_path):
    """CLIPTextModelWithProjection (`text_model.*` + `text_projection.weight`) and a plain
    CLIPVisionModel (transformers 5 saves it unprefixed) load leaf for leaf, also as bf16."""
    import ml_dtypes
    from transformers import CLIPTextConfig as HFText, CLIPTextModelWithProjection
    from transformers import CLIPVisionConfig as HFVision, CLIPVisionModel as HFVisionModel

    text = randomise_clip(CLIPTextModelWithProjection(HFText(**TEXT_HF, eos_token_id=VOCAB - 1,
                                                         projection_dim=PROJ)), seed=5)
    text.save_pretrained(tmp_path / "text", safe_serialization=True)
    config, params = load_clip_text(tmp_path / "text", dtype=ml_dtypes.bfloat16)
    assert config.projection_dim == PROJ and config.eos_token_id == VOCAB - 1
    state = {k: v.numpy() for k, v in text.state_dict().items()}
    np.testing.assert_array_equal(params["text_projection"]["kernel"],
                                  state["text_projection.weight"].T.astype(ml_dtypes.bfloat16))
    assert params["final_layer_norm"]["scale"].dtype == ml_dtypes.bfloat16

    vision = randomise_clip(HFVisionModel(HFVision(**VISION_HF, projection_dim=PROJ)), seed=6)
    vision.save_pretrained(tmp_path / "vision", safe_serialization=True)
    config, params = load_clip_vision(tmp_path / "vision")
    assert config.projection_dim is None and "visual_projection" not in params
    state = {k.removeprefix("vision_model."): v.numpy() for k, v in vision.state_dict().items()}
    np.testing.assert_array_equal(params["embeddings"]["patch_embedding"]["kernel"],
                                  state["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["encoder"]["layers_1"]["mlp"]["fc2"]["kernel"],
                                  state["encoder.layers.1.mlp.fc2.weight"].T)
    np.testing.assert_array_equal(params["pre_layrnorm"]["bias"], state["pre_layrnorm.bias"])
