"""Reward models: parity of scores and image gradients with torch references, errors.

Tiny random transformers `CLIPModel`s (every parameter randomised) are the references:
saved as folders for pickscore / clip_score / the aesthetic backbone, and rewritten by this
file (its own mapping, independent of the loader) into OpenCLIP's layout as a torch pickle
for hpsv21. Torch preprocessing is `F.interpolate(bicubic, antialias=True)` + crop +
normalise, differentiated by autograd. Inputs: an upsampled (40x72) and a downsampled
(300x406) size, both with an odd crop margin whose half rounds differently under
torchvision's round and transformers' floor. Relative error = max|ours - torch| / max|torch|.
"""

import functools
import json
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leapalign_jax.rewards import load_reward, load_rewards, reward_weights
from leapalign_jax.rewards.aesthetic import load_backbone
from leapalign_jax.rewards.combine import combine
from leapalign_jax.rewards.hpsv21 import load_openclip
from leapalign_jax.rewards.preprocess import CLIP_MEAN, CLIP_STD, crop_offsets, preprocess
from clip_random import randomise_clip

SIZES = [(40, 72), (300, 406)]  # upsampled, downsampled (after the resize: 224x403, 224x303)
PROJ = 24
PROMPTS = ["the cat on the mat", "a red fox in snow"]


def _rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny CLIP BPE vocabulary: letters, a few merges, BOS and EOS the largest ids."""
    folder = tmp_path_factory.mktemp("tokenizer")
    letters = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(letters)}
    vocab |= {c + "</w>": len(letters) + i for i, c in enumerate(letters)}
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("o", "n</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def _vocab_size(tokenizer_dir):
    return len(json.loads((tokenizer_dir / "vocab.json").read_text()))


@functools.lru_cache(maxsize=None)
def _torch_clip(vocab, hidden_act, seed):
    """A tiny CLIPModel: 224 images in 4x4 patches of 56, 2 layers, width 32, 4 heads."""
    import transformers

    tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, hidden_act=hidden_act, layer_norm_eps=1e-5)
    config = transformers.CLIPConfig(
        text_config=dict(tower, vocab_size=vocab, max_position_embeddings=77,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(tower, image_size=224, patch_size=56, num_channels=3),
        projection_dim=PROJ)
    return randomise_clip(transformers.CLIPModel(config), seed)


@pytest.fixture(scope="module")
def gelu_clip(tokenizer_dir, tmp_path_factory):
    """(torch model, saved folder) with exact GELU, as ViT-H-14 (PickScore, HPSv2)."""
    model = _torch_clip(_vocab_size(tokenizer_dir), "gelu", 0)
    folder = tmp_path_factory.mktemp("clip_gelu")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.fixture(scope="module")
def quick_clip(tokenizer_dir, tmp_path_factory):
    """(torch model, saved folder) with quick_gelu, as OpenAI ViT-L/14; ships its tokenizer."""
    model = _torch_clip(_vocab_size(tokenizer_dir), "quick_gelu", 1)
    folder = tmp_path_factory.mktemp("clip_quick")
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    return model, folder


def _openclip_state_dict(model):
    """A transformers CLIPModel's weights under OpenCLIP's names and layouts."""
    sd = {}

    def linear(dst, src):
        sd[dst + ".weight"], sd[dst + ".bias"] = src.weight, src.bias

    def blocks(prefix, encoder):
        for i, layer in enumerate(encoder.layers):
            p, a = f"{prefix}transformer.resblocks.{i}.", layer.self_attn
            sd[p + "attn.in_proj_weight"] = torch_cat([a.q_proj.weight, a.k_proj.weight,
                                                      a.v_proj.weight])
            sd[p + "attn.in_proj_bias"] = torch_cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            linear(p + "attn.out_proj", a.out_proj)
            linear(p + "ln_1", layer.layer_norm1)
            linear(p + "ln_2", layer.layer_norm2)
            linear(p + "mlp.c_fc", layer.mlp.fc1)
            linear(p + "mlp.c_proj", layer.mlp.fc2)

    def torch_cat(xs):
        import torch
        return torch.cat(xs, 0)

    t, v = model.text_model, model.vision_model
    sd["token_embedding.weight"] = t.embeddings.token_embedding.weight
    sd["positional_embedding"] = t.embeddings.position_embedding.weight
    blocks("", t.encoder)
    linear("ln_final", t.final_layer_norm)
    sd["text_projection"] = model.text_projection.weight.t()  # (width, embed), a strided view
    sd["visual.class_embedding"] = v.embeddings.class_embedding
    sd["visual.conv1.weight"] = v.embeddings.patch_embedding.weight
    sd["visual.positional_embedding"] = v.embeddings.position_embedding.weight
    linear("visual.ln_pre", v.pre_layrnorm)
    blocks("visual.", v.encoder)
    linear("visual.ln_post", v.post_layernorm)
    sd["visual.proj"] = model.visual_projection.weight.t()
    sd["logit_scale"] = model.logit_scale
    return {k: x.detach() for k, x in sd.items()}


@pytest.fixture(scope="module")
def hps_file(gelu_clip, tmp_path_factory):
    import torch

    file = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": _openclip_state_dict(gelu_clip[0])}, file)
    return file


@functools.lru_cache(maxsize=None)
def _torch_head(seed):
    """The LAION MLP layout (layers.0/2/4/6/7), tiny widths, every parameter random."""
    import torch

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(PROJ, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 16),
                torch.nn.Dropout(0.2), torch.nn.Linear(16, 8), torch.nn.Dropout(0.1),
                torch.nn.Linear(8, 4), torch.nn.Linear(4, 1))

        def forward(self, x):
            return self.layers(x)

    torch.manual_seed(seed)
    head = MLP()
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(0.5 * torch.randn(p.shape) + 0.1)
    return head.eval()


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    import torch

    file = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(_torch_head(0).state_dict(), file)
    return file


@pytest.fixture(scope="module")
def hps_reward(hps_file, tokenizer_dir):
    return load_reward("hpsv21", hps_file, tokenizer=tokenizer_dir, text_heads=4, vision_heads=4)


@pytest.fixture(scope="module")
def aesthetic_reward(head_file, quick_clip):
    return load_reward("aesthetic", head_file, backbone=quick_clip[1])


def _images(shape, seed=0):
    return np.random.default_rng(seed).random((2, *shape, 3), dtype=np.float32)


# ----------------------------------------------------------------------------- torch references


def _torch_preprocess(x, crop):
    """NHWC torch images in [0, 1] -> NCHW pixels, as torchvision / HF do it."""
    import torch
    import torch.nn.functional as F
    from transformers.image_transforms import get_resize_output_image_size

    x = x.permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    new = get_resize_output_image_size(np.zeros((3, h, w)), 224, default_to_square=False,
                                       input_data_format="channels_first")
    if tuple(new) != (h, w):
        x = F.interpolate(x, size=tuple(new), mode="bicubic", antialias=True, align_corners=False)
    h, w = new
    if crop == "round":  # torchvision CenterCrop
        top, left = int(round((h - 224) / 2.0)), int(round((w - 224) / 2.0))
    else:  # transformers CLIPImageProcessor
        top, left = int((h - 224) / 2.0), int((w - 224) / 2.0)
    x = x[..., top:top + 224, left:left + 224]
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    return (x - mean) / torch.tensor(CLIP_STD)[:, None, None]


def _torch_reward(model, images, ids, mask, kind, head=None):
    """(scores, d sum(scores) / d images) of the torch reference."""
    import torch

    x = torch.tensor(images, requires_grad=True)
    crop = "floor" if kind in ("pickscore", "clip_score") else "round"
    pixels = _torch_preprocess(x, crop)
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    image = image / image.norm(dim=-1, keepdim=True)
    if kind == "aesthetic":
        scores = head(image)[:, 0]
    else:
        with torch.no_grad():
            text = model.text_projection(model.text_model(
                input_ids=torch.tensor(ids), attention_mask=mask).pooler_output)
            text = text / text.norm(dim=-1, keepdim=True)
        scores = (image * text).sum(-1)
        if kind == "pickscore":
            scores = model.logit_scale.exp() * scores
    scores.sum().backward()
    return scores.detach().numpy(), x.grad.numpy()


def _hf_ids(tokenizer_dir, prompts):
    """As PickScore / transformers pipelines call it: pad to the longest, with a mask."""
    import torch
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    out = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="np")
    return out["input_ids"], torch.tensor(out["attention_mask"])


def _openclip_ids(tokenizer_dir, prompts):
    """As OpenCLIP's tokenizer: SOT, tokens, EOT, zeros to 77; no attention mask."""
    ids, mask = _hf_ids(tokenizer_dir, prompts)
    ids = np.where(mask.numpy() > 0, ids, 0)
    return np.pad(ids, ((0, 0), (0, 77 - ids.shape[1]))), None


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("shape, crop", [
    ((64, 64), "round"), ((48, 80), "round"), ((720, 720), "round"), ((320, 400), "floor"),
    *[(size, crop) for size in SIZES for crop in ("round", "floor")]])
def test_preprocess_matches_torch(shape, crop):
    import torch

    images = _images(shape)
    cotangent = np.random.default_rng(1).standard_normal((2, 224, 224, 3)).astype(np.float32)
    ours, vjp = jax.vjp(lambda x: preprocess(x, crop=crop), jnp.asarray(images))
    x = torch.tensor(images, requires_grad=True)
    ref = _torch_preprocess(x, crop).permute(0, 2, 3, 1)
    (ref * torch.tensor(cotangent)).sum().backward()
    assert ours.shape == (2, 224, 224, 3)
    assert np.max(np.abs(np.asarray(ours) - ref.detach().numpy())) < 1e-4
    assert _rel(vjp(jnp.asarray(cotangent))[0], x.grad.numpy()) < 1e-4


def test_resize_and_crop_rules():
    """Sizes as transformers computes them; torchvision's round vs transformers' floor."""
    from transformers.image_transforms import center_crop, get_resize_output_image_size

    from leapalign_jax.rewards.preprocess import resized_size

    for h, w in [(40, 72), (300, 406), (72, 40), (225, 1000), (1000, 223), (224, 224), (7, 9)]:
        expected = get_resize_output_image_size(np.zeros((h, w, 3)), 224, default_to_square=False,
                                                input_data_format="channels_last")
        assert resized_size(h, w) == tuple(expected), (h, w)
    for h, w in [(224, 227), (229, 224), (403, 224), (303, 301)]:
        image = np.arange(h * w, dtype=np.float32).reshape(h, w, 1)
        cropped = center_crop(image, (224, 224), input_data_format="channels_last")
        top, left = crop_offsets(h, w, 224, "floor")
        np.testing.assert_array_equal(cropped, image[top:top + 224, left:left + 224])
    # torchvision CenterCrop: int(round(margin / 2)), halves to even
    assert crop_offsets(227, 224 + 5, 224, "round") == (2, 2)
    assert crop_offsets(227, 224 + 5, 224, "floor") == (1, 2)
    assert crop_offsets(403, 303, 224, "round") == (90, 40)
    assert crop_offsets(403, 303, 224, "floor") == (89, 39)
    with pytest.raises(ValueError, match="unknown crop rounding"):
        crop_offsets(300, 300, 224, "ceil")
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        preprocess(jnp.zeros((2, 3, 64, 64)))


# ----------------------------------------------------------------------------- parity


def _check_parity(reward, model, ids, mask, kind, head=None):
    features = reward.encode_text(PROMPTS)

    def value_and_grad(params, images):
        scores, vjp = jax.vjp(lambda im: reward.score(params, im, features), images)
        return scores, vjp(jnp.ones_like(scores))[0]

    # one compilation for both sizes
    images = [_images(shape, seed=shape[0]) for shape in SIZES]
    results = jax.jit(lambda p, *xs: [value_and_grad(p, x) for x in xs])(
        reward.params, *map(jnp.asarray, images))
    errors = []
    for shape, x, (scores, grad) in zip(SIZES, images, results):
        ref_scores, ref_grad = _torch_reward(model, x, ids, mask, kind, head)
        errors.append((shape, _rel(scores, ref_scores), _rel(grad, ref_grad)))
        assert scores.shape == (2,) and scores.dtype == jnp.float32
        assert _rel(scores, ref_scores) < 1e-3, (kind, shape, scores, ref_scores)
        assert _rel(grad, ref_grad) < 1e-2, (kind, shape)
    print(kind, "(size, score error, gradient error):", errors)


def test_pickscore_parity(gelu_clip, tokenizer_dir):
    model, folder = gelu_clip
    reward = load_reward("pickscore", folder, tokenizer=tokenizer_dir)
    ids, mask = _hf_ids(tokenizer_dir, PROMPTS)
    _check_parity(reward, model, ids, mask, "pickscore")


def test_clip_score_parity(quick_clip):
    model, folder = quick_clip
    reward = load_reward("clip_score", folder)  # tokenizer from the model folder
    ids, mask = _hf_ids(folder, PROMPTS)
    _check_parity(reward, model, ids, mask, "clip_score")


def test_hpsv21_parity(gelu_clip, hps_reward, tokenizer_dir):
    ids, mask = _openclip_ids(tokenizer_dir, PROMPTS)
    _check_parity(hps_reward, gelu_clip[0], ids, mask, "hpsv21")


def test_aesthetic_parity(quick_clip, aesthetic_reward):
    assert aesthetic_reward.encode_text(PROMPTS).shape == (2, 0)
    _check_parity(aesthetic_reward, quick_clip[0], None, None, "aesthetic", head=_torch_head(0))


def test_openclip_mapping_is_multihead_attention(gelu_clip):
    """The fused in_proj layout this file writes is what torch's nn.MultiheadAttention
    (OpenCLIP's attention) reads: q, k, v stacked in that order."""
    import torch

    model = gelu_clip[0]
    sd = _openclip_state_dict(model)
    attention = model.vision_model.encoder.layers[1].self_attn
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    mha.load_state_dict({k.split("attn.")[1]: v for k, v in sd.items()
                         if k.startswith("visual.transformer.resblocks.1.attn.")})
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        np.testing.assert_allclose(mha(x, x, x, need_weights=False)[0].numpy(),
                                   attention(x)[0].numpy(), atol=1e-5)


def test_openclip_padding_and_fp16(gelu_clip, hps_file, hps_reward, tokenizer_dir, tmp_path):
    """OpenCLIP pads with 0, transformers with EOS: the same text features under the
    causal mask. An fp16 checkpoint loads as its fp32 values rounded to fp16."""
    import torch

    eos_padded = hps_reward.tokenize(PROMPTS)
    zero_padded, _ = _openclip_ids(tokenizer_dir, PROMPTS)
    assert eos_padded.shape == zero_padded.shape == (2, 77)
    assert (eos_padded == _vocab_size(tokenizer_dir) - 1).sum() > 2  # padded with EOS
    assert not np.array_equal(eos_padded, zero_padded)
    embed = jax.jit(hps_reward.embed_text)
    np.testing.assert_allclose(embed(hps_reward.text_params, jnp.asarray(eos_padded)),
                               embed(hps_reward.text_params, jnp.asarray(zero_padded)),
                               atol=1e-6)

    half = tmp_path / "half.pt"
    torch.save({"state_dict": {k: v.half() for k, v in
                               _openclip_state_dict(gelu_clip[0]).items()}}, half)
    _, full_params = load_openclip(hps_file, text_heads=4, vision_heads=4)
    config, half_params = load_openclip(half, text_heads=4, vision_heads=4)
    assert config.vision.hidden_size == 32 and config.vision.num_layers == 2
    assert config.vision.patch_size == 56 and config.vision.image_size == 224
    assert config.text.max_position_embeddings == 77 and config.projection_dim == PROJ
    jax.tree.map(lambda f, h: np.testing.assert_array_equal(
        np.asarray(f).astype(np.float16).astype(np.float32), h), full_params, half_params)


def test_vision_only_backbone(quick_clip, tmp_path):
    """A CLIPVisionModelWithProjection folder gives the same backbone as the CLIPModel."""
    import transformers

    model, folder = quick_clip
    config = transformers.CLIPVisionConfig(**{**model.config.vision_config.to_dict(),
                                              "projection_dim": PROJ})
    vision = transformers.CLIPVisionModelWithProjection(config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    vision.save_pretrained(tmp_path, safe_serialization=True)
    (_, a), (_, b) = load_backbone(folder), load_backbone(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_torch_bin_folder(gelu_clip, tmp_path):
    """A CLIPModel folder holding only pytorch_model.bin loads as its safetensors twin."""
    import torch

    from leapalign_jax.rewards.base import load_clip_folder

    model, folder = gelu_clip
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (_, a), (_, b) = load_clip_folder(folder), load_clip_folder(tmp_path)
    assert set(a) == {"text_model", "vision_model", "logit_scale"}
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_full_size_shapes(tmp_path):
    """ViT-H-14 sizes come out of OpenCLIP shapes; a real-size LAION head loads."""
    import torch

    from leapalign_jax.rewards.aesthetic import load_head
    from leapalign_jax.rewards.hpsv21 import openclip_config

    shapes = {"token_embedding.weight": (49408, 1024), "positional_embedding": (77, 1024),
              "text_projection": (1024, 1024), "visual.conv1.weight": (1280, 3, 14, 14),
              "visual.positional_embedding": (257, 1280), "visual.proj": (1280, 1024),
              "transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024),
              "visual.transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280)}
    shapes |= {f"transformer.resblocks.{i}.ln_1.weight": (1024,) for i in range(24)}
    shapes |= {f"visual.transformer.resblocks.{i}.ln_1.weight": (1280,) for i in range(32)}
    config = openclip_config(shapes, "HPS_v2.1_compressed.pt")
    assert (config.text.hidden_size, config.text.num_layers, config.text.num_heads,
            config.text.intermediate_size, config.text.max_position_embeddings,
            config.text.hidden_act) == (1024, 24, 16, 4096, 77, "gelu")
    assert (config.vision.hidden_size, config.vision.num_layers, config.vision.num_heads,
            config.vision.intermediate_size, config.vision.patch_size,
            config.vision.image_size) == (1280, 32, 16, 5120, 14, 224)
    assert config.projection_dim == 1024

    widths = [768, 1024, 128, 64, 16, 1]
    layers = [torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    state = {f"layers.{i}.{k}": v for i, layer in zip((0, 2, 4, 6, 7), layers)
             for k, v in layer.state_dict().items()}
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    width_in, out, params = load_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    assert width_in == 768 and out == (1024, 128, 64, 16, 1)
    np.testing.assert_array_equal(params["layers_2"]["kernel"], layers[1].weight.detach().T)


# ----------------------------------------------------------------------------- combination


def test_combined_reward(quick_clip, hps_file, head_file, hps_reward, aesthetic_reward,
                         tokenizer_dir):
    combined = load_rewards("hpsv21:1.0, aesthetic:0.05", {
        "hpsv21": {"path": hps_file, "tokenizer": tokenizer_dir, "text_heads": 4,
                   "vision_heads": 4},
        "aesthetic": {"path": head_file, "backbone": quick_clip[1]},
        "pickscore": {"path": "unused"}})
    assert list(combined.rewards) == ["hpsv21", "aesthetic"]
    assert combined.weights == {"hpsv21": 1.0, "aesthetic": 0.05}
    images = jnp.asarray(_images(SIZES[0]))
    features = combined.encode_text(PROMPTS)
    singles = {"hpsv21": hps_reward, "aesthetic": aesthetic_reward}

    @jax.jit
    def run(params, images):
        (total, terms), vjp = jax.vjp(lambda x: combined.score(params, x, features), images)
        return total, terms, vjp((jnp.ones_like(total), jax.tree.map(jnp.zeros_like, terms)))[0]

    total, terms, grad = run(combined.params, images)
    for name, reward in singles.items():  # the convenience call: jitted score of one reward
        np.testing.assert_allclose(terms[name], reward(images, PROMPTS), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total, terms["hpsv21"] + 0.05 * terms["aesthetic"], rtol=1e-6)
    assert grad.shape == images.shape and bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.abs(grad).max()) > 0


def test_reward_weights_parsing():
    assert reward_weights("hpsv21:1.0,pickscore:0.05") == [("hpsv21", 1.0), ("pickscore", 0.05)]
    assert reward_weights(" hpsv21 , aesthetic:-2") == [("hpsv21", 1.0), ("aesthetic", -2.0)]
    assert reward_weights(["clip_score:3", ("aesthetic", 1)]) == [("clip_score", 3.0),
                                                                  ("aesthetic", 1.0)]
    assert reward_weights({"pickscore": 0.5}) == [("pickscore", 0.5)]
    for spec, message in [("hps:1", "unknown reward 'hps'; known: aesthetic, clip_score"),
                          ("hpsv21:abc", "weight 'abc' of hpsv21 is not a number"),
                          ("hpsv21:nan", "must be finite"),
                          ("hpsv21:1,hpsv21:2", "hpsv21 appears twice"),
                          ("", "no reward named"),
                          ([("hpsv21", 1, 2)], "cannot read")]:
        with pytest.raises(ValueError, match=message) as err:
            reward_weights(spec)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="'pickscore' is weighted but not loaded"):
        combine({}, [("pickscore", 1.0)])


# ----------------------------------------------------------------------------- errors


def _one_line(err):
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


def test_bad_inputs(hps_file, head_file, gelu_clip, quick_clip, tokenizer_dir, tmp_path):
    import torch

    with pytest.raises(ValueError, match="unknown reward 'hpsv3'; known: aesthetic, clip_score, "
                                         "hpsv21, pickscore") as err:
        load_reward("hpsv3", hps_file)
    _one_line(err)
    with pytest.raises(FileNotFoundError, match="torch checkpoint not found") as err:
        load_reward("hpsv21", tmp_path / "absent.pt", tokenizer=tokenizer_dir)
    _one_line(err)
    with pytest.raises(ValueError, match="pass tokenizer=") as err:
        load_reward("hpsv21", hps_file)
    _one_line(err)
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found") as err:
        load_reward("hpsv21", hps_file, tokenizer=tmp_path / "no_tok", text_heads=4,
                    vision_heads=4)
    _one_line(err)
    with pytest.raises(ValueError, match="not an OpenCLIP ViT state dict") as err:
        load_reward("hpsv21", head_file, tokenizer=tokenizer_dir)  # the aesthetic head
    assert str(head_file) in _one_line(err)
    with pytest.raises(ValueError, match="unexpected keyword argument 'tokeniser'") as err:
        load_reward("hpsv21", hps_file, tokeniser=tokenizer_dir)
    _one_line(err)

    # a tensor missing from the OpenCLIP checkpoint: the first line names file and fix
    sd = torch.load(hps_file)["state_dict"]
    del sd["visual.transformer.resblocks.1.attn.in_proj_bias"]
    broken = tmp_path / "broken.pt"
    torch.save({"state_dict": sd}, broken)
    with pytest.raises(ValueError) as err:
        load_reward("hpsv21", broken, tokenizer=tokenizer_dir, text_heads=4, vision_heads=4)
    first, *rest = str(err.value).split("\n")
    assert str(broken) in first and "HPS_v2.1_compressed.pt" in first
    assert rest == ["  missing visual.transformer.resblocks.1.attn.in_proj_bias: expected (96,)"]

    # HF folders: missing, or an OpenCLIP file where a folder belongs
    with pytest.raises(FileNotFoundError, match="CLIP checkpoint folder not found") as err:
        load_reward("pickscore", hps_file, tokenizer=tokenizer_dir)
    _one_line(err)
    with pytest.raises(ValueError, match="no tokenizer given") as err:
        load_reward("pickscore", gelu_clip[1])  # a model folder without tokenizer files
    _one_line(err)

    # aesthetic: head of the wrong layout, no backbone, mismatched widths
    with pytest.raises(ValueError, match="no layers.0.weight") as err:
        load_reward("aesthetic", hps_file, backbone=quick_clip[1])
    _one_line(err)
    with pytest.raises(ValueError, match="pass backbone=") as err:
        load_reward("aesthetic", head_file)
    _one_line(err)
    wide = tmp_path / "wide.pth"
    state = {k: v for k, v in _torch_head(0).state_dict().items()}
    state["layers.0.weight"] = torch.zeros(32, 768)
    torch.save(state, wide)
    with pytest.raises(ValueError, match="reads 768-d embeddings but .* gives 24-d") as err:
        load_reward("aesthetic", wide, backbone=quick_clip[1])
    _one_line(err)


def test_bfloat16_compute(hps_file, hps_reward, tokenizer_dir):
    """dtype="bfloat16" runs the towers in bf16 with float32 params and float32 scores."""
    reward = load_reward("hpsv21", hps_file, tokenizer=tokenizer_dir, text_heads=4,
                         vision_heads=4, dtype="bfloat16")
    assert jax.tree.leaves(reward.params)[0].dtype == jnp.float32
    images = jnp.asarray(_images(SIZES[1]))
    scores = reward(images, PROMPTS)
    assert scores.dtype == jnp.float32
    assert _rel(scores, hps_reward(images, PROMPTS)) < 5e-2
