"""FLUX.1 folder -> JAX pipeline: parity with diffusers' torch FluxPipeline, and errors.

A tiny random pipeline is built with diffusers / transformers (every parameter randomised)
and saved in FLUX.1's layout (tests/flux_fixtures.py); diffusers' FluxPipeline reads it back
as the reference, and `load_flux_pipeline` must match its `encode_prompt`, its decoding and
a 4-step sampling run in float32. The folder writer that needs no torch
(`write_tiny_flux_folder`) must produce a folder diffusers loads and agrees with, and bad
folders must fail with errors whose first line names the file, the key and the fix.
"""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.numpy import load_file, save_file  # noqa: E402

import flux_fixtures  # noqa: E402
from leapalign_jax.flux_pipeline import load_flux_pipeline  # noqa: E402
from leapalign_jax.weights import flux_folder  # noqa: E402
from leapalign_jax.weights.autoencoder import flax_to_bfl  # noqa: E402

PROMPTS = ["a photo of a red cat", "Two BLUE squares on the table, small & large!", ""]
SEQ = 24  # T5 tokens (FLUX.1-dev pads to 512; short keeps the test fast)
SIZE = 32  # image side: the tiny VAE is 2x down, so 16x16 latents, 64 packed tokens


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def torch_folder(tmp_path_factory):
    """(folder, diffusers FluxPipeline) of a tiny random torch-built FLUX.1 folder."""
    folder = str(tmp_path_factory.mktemp("flux_torch"))
    return folder, flux_fixtures.build_torch_flux_folder(folder, seed=0)


@pytest.fixture(scope="module")
def pipes(torch_folder):
    """(ours, reference) for the torch-built folder."""
    folder, ref = torch_folder
    return load_flux_pipeline(folder), ref


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A folder written by write_tiny_flux_folder (no torch)."""
    folder = str(tmp_path_factory.mktemp("flux_tiny"))
    flux_folder.write_tiny_flux_folder(folder, seed=3)
    return folder


def packed_noise(ref, batch: int, seed: int = 0) -> np.ndarray:
    """FluxPipeline-packed N(0, 1) latents (B, L, 4C) for a SIZE x SIZE image."""
    side = 2 * (SIZE // (ref.vae_scale_factor * 2))
    channels = ref.transformer.config.in_channels
    return np.random.default_rng(seed).standard_normal(
        (batch, (side // 2) ** 2, channels)).astype(np.float32)


def reference_decode(ref, packed: np.ndarray) -> np.ndarray:
    latents = ref._unpack_latents(torch.from_numpy(packed), SIZE, SIZE, ref.vae_scale_factor)
    latents = latents / ref.vae.config.scaling_factor + ref.vae.config.shift_factor
    with torch.no_grad():
        image = ref.vae.decode(latents, return_dict=False)[0]
    return ref.image_processor.postprocess(image, output_type="np")


# ----------------------------------------------------------------------------- parity


def test_encode_prompts_match_diffusers(pipes):
    ours, ref = pipes
    embeds, pooled = ours.encode_prompts(PROMPTS, max_sequence_length=SEQ)
    with torch.no_grad():
        ref_embeds, ref_pooled, text_ids = ref.encode_prompt(
            PROMPTS, prompt_2=None, max_sequence_length=SEQ)
    assert embeds.shape == tuple(ref_embeds.shape) == (3, SEQ, 32)
    assert pooled.shape == tuple(ref_pooled.shape) == (3, 16)
    assert rel_err(embeds, ref_embeds.numpy()) < 1e-4
    assert rel_err(pooled, ref_pooled.numpy()) < 1e-4
    assert not text_ids.numpy().any()  # FLUX.1's text ids are zeros, as velocity() uses
    # The pads are attended (no mask): the same prompt padded further changes its tokens.
    longer, _ = ours.encode_prompts(PROMPTS[:1], max_sequence_length=SEQ + 8)
    assert np.abs(np.asarray(longer[0, :4]) - np.asarray(embeds[0, :4])).max() > 1e-6


def test_decode_matches_diffusers(pipes):
    ours, ref = pipes
    packed = packed_noise(ref, 2)
    images = np.asarray(ours.decode(packed, height=SIZE, width=SIZE))
    expected = reference_decode(ref, packed)
    assert images.shape == expected.shape == (2, SIZE, SIZE, 3)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert rel_err(images, expected) < 1e-4


def test_sample_matches_diffusers(pipes):
    ours, ref = pipes
    latents = packed_noise(ref, 2, seed=1)
    images = ours.sample(PROMPTS[:2], height=SIZE, width=SIZE, num_steps=4, guidance=3.5,
                         latents=latents, max_sequence_length=SEQ)
    expected = ref(PROMPTS[:2], height=SIZE, width=SIZE, num_inference_steps=4,
                   guidance_scale=3.5, latents=torch.from_numpy(latents), output_type="np",
                   max_sequence_length=SEQ).images
    assert images.shape == expected.shape == (2, SIZE, SIZE, 3)
    assert rel_err(images, expected) < 1e-3
    # Drawn noise: deterministic in the seed, and the seed matters.
    a = ours.sample(PROMPTS[:1], height=SIZE, width=SIZE, num_steps=4, seed=5,
                    max_sequence_length=SEQ)
    b = ours.sample(PROMPTS[:1], height=SIZE, width=SIZE, num_steps=4, seed=5,
                    max_sequence_length=SEQ)
    c = ours.sample(PROMPTS[:1], height=SIZE, width=SIZE, num_steps=4, seed=6,
                    max_sequence_length=SEQ)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_pure_pieces_for_the_trainer(pipes):
    """velocity_fn / decode_fn take the params as arguments: the velocity equals diffusers'
    transformer as FluxPipeline calls it, decode_fn equals decode, and gradients flow."""
    from leapalign_jax import flow

    ours, ref = pipes
    latents = packed_noise(ref, 2, seed=1)
    embeds, pooled = ours.encode_prompts(PROMPTS[:2], max_sequence_length=SEQ)
    cond = ours.condition(embeds, pooled, guidance=3.5)
    velocity, decode = ours.velocity_fn(SIZE, SIZE), ours.decode_fn(SIZE, SIZE)
    params = ours.params["transformer"]
    sigma = np.array([0.9, 0.4], np.float32)
    v = jax.jit(velocity)(params, latents, sigma, cond)
    side = SIZE // ref.vae_scale_factor // 2
    with torch.no_grad():
        expected = ref.transformer(
            hidden_states=torch.from_numpy(latents), timestep=torch.from_numpy(sigma),
            guidance=torch.full((2,), 3.5), pooled_projections=torch.tensor(np.asarray(pooled)),
            encoder_hidden_states=torch.tensor(np.asarray(embeds)),
            txt_ids=torch.zeros(SEQ, 3),
            img_ids=ref._prepare_latent_image_ids(2, side, side, "cpu", torch.float32),
            return_dict=False)[0]
    assert rel_err(v, expected.numpy()) < 1e-4
    np.testing.assert_allclose(jax.jit(decode)(ours.params["vae"], latents),
                               ours.decode(latents, SIZE, SIZE), atol=1e-6)

    def loss(p):
        return flow.clean_estimate(lambda p, x, s: velocity(p, x, s, cond), p, latents,
                                   0.5).mean()

    norms = [float(np.linalg.norm(g)) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(params))]
    assert all(np.isfinite(norms)) and max(norms) > 0


def test_schnell_like_sample_matches_diffusers(tmp_path):
    """No guidance embedding and a constant-shift schedule (FLUX.1-schnell's layout)."""
    folder = str(tmp_path / "schnell")
    ref = flux_fixtures.build_torch_flux_folder(
        folder, seed=1, guidance_embeds=False,
        scheduler=dict(shift=1.0, use_dynamic_shifting=False))
    ours = load_flux_pipeline(folder)
    assert not ours.transformer.guidance_embed and not ours.scheduler.use_dynamic_shifting
    latents = packed_noise(ref, 1, seed=3)
    images = ours.sample(PROMPTS[1:2], height=SIZE, width=SIZE, num_steps=2, guidance=7.0,
                         latents=latents, max_sequence_length=SEQ)
    expected = ref(PROMPTS[1:2], height=SIZE, width=SIZE, num_inference_steps=2,
                   guidance_scale=7.0, latents=torch.from_numpy(latents), output_type="np",
                   max_sequence_length=SEQ).images
    assert rel_err(images, expected) < 1e-3


def test_bfloat16_compute_dtype(torch_folder):
    """dtype= sets every network's compute dtype; params stay float32. (Each component's
    bf16 accuracy is tested with the component.)"""
    bf16 = load_flux_pipeline(torch_folder[0], dtype="bfloat16")
    assert {bf16.transformer.dtype, bf16.t5.dtype, bf16.clip.dtype, bf16.vae.dtype} == {
        "bfloat16"}
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16.params)} == {np.dtype(np.float32)}


@pytest.mark.parametrize("config", [
    flux_fixtures.SCHEDULER,  # FLUX.1-dev: resolution-dependent shift
    dict(shift=1.0, use_dynamic_shifting=False),  # FLUX.1-schnell
    dict(shift=3.0, use_dynamic_shifting=False, shift_terminal=0.1),
    dict(use_dynamic_shifting=True, time_shift_type="linear", base_image_seq_len=64,
         max_image_seq_len=1024, base_shift=0.3, max_shift=0.9)])
def test_schedule_matches_the_scheduler(config, tmp_path):
    """Sigmas equal FluxPipeline's bit for bit; the transformer's timesteps to an ulp."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    scheduler.save_pretrained(str(tmp_path / "scheduler"))
    ours = flux_folder.read_scheduler_config(str(tmp_path))
    c = scheduler.config
    for steps, seq_len in [(1, 64), (4, 256), (28, 4096), (50, 1369)]:
        if steps == 1 and c.get("shift_terminal"):
            with pytest.raises(ValueError, match="shift_terminal needs num_steps >= 2"):
                ours.sigmas(steps, seq_len)  # diffusers divides 0 by 0 there
            continue
        mu = calculate_shift(seq_len, c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                             c.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        sigmas = ours.sigmas(steps, seq_len)
        np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())
        # The transformer's t: diffusers' sigma * 1000 / 1000 is sigma to within one ulp.
        np.testing.assert_allclose(sigmas[:-1] * (c.num_train_timesteps / 1000),
                                   (scheduler.timesteps / 1000).numpy(), rtol=1.2e-7, atol=0)


def test_tiny_folder_writer_loads_in_diffusers(tiny_folder):
    """The torch-free writer's folder: diffusers reads it and agrees with us."""
    ref = diffusers.FluxPipeline.from_pretrained(tiny_folder, dtype=torch.float32)
    ours = load_flux_pipeline(tiny_folder)
    assert ours.t5.vocab_size == 128 and ours.vae.latent_channels == 4
    embeds, pooled = ours.encode_prompts(PROMPTS, max_sequence_length=SEQ)
    with torch.no_grad():
        ref_embeds, ref_pooled, _ = ref.encode_prompt(PROMPTS, prompt_2=None,
                                                      max_sequence_length=SEQ)
    assert rel_err(embeds, ref_embeds.numpy()) < 1e-4
    assert rel_err(pooled, ref_pooled.numpy()) < 1e-4
    packed = packed_noise(ref, 1)
    assert rel_err(ours.decode(packed, SIZE, SIZE), reference_decode(ref, packed)) < 1e-4
    latents = packed_noise(ref, 1, seed=2)
    images = ours.sample(PROMPTS[:1], height=SIZE, width=SIZE, num_steps=2, latents=latents,
                         max_sequence_length=SEQ)
    expected = ref(PROMPTS[:1], height=SIZE, width=SIZE, num_inference_steps=2,
                   latents=torch.from_numpy(latents), output_type="np",
                   max_sequence_length=SEQ).images
    assert rel_err(images, expected) < 1e-3
    # Deterministic in the seed.
    again = str(os.path.join(tiny_folder, "again"))
    flux_folder.write_tiny_flux_folder(again, seed=3)
    for name in ("transformer/diffusion_pytorch_model.safetensors",
                 "text_encoder_2/model-00001-of-00002.safetensors"):
        a, b = load_file(os.path.join(tiny_folder, name)), load_file(os.path.join(again, name))
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_loading_onto_a_mesh(tiny_folder):
    """mesh=...: the same pipeline, its big components built on their device shards."""
    from leapalign_jax import parallel

    plain = load_flux_pipeline(tiny_folder)
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    sharded = load_flux_pipeline(tiny_folder, mesh=mesh)
    leaf = sharded.params["transformer"]["img_in"]["kernel"]
    assert isinstance(leaf.sharding, jax.sharding.NamedSharding)
    for key in ("transformer", "t5", "vae", "clip"):
        jax.tree.map(np.testing.assert_array_equal, sharded.params[key], plain.params[key])
    embeds, pooled = sharded.encode_prompts(PROMPTS[:1], max_sequence_length=SEQ)
    np.testing.assert_allclose(embeds, plain.encode_prompts(PROMPTS[:1], SEQ)[0], atol=1e-6)


def test_bfl_autoencoder_file(tiny_folder, tmp_path):
    """Without vae/, BFL's ae.safetensors beside the components is used (or vae_path)."""
    from leapalign_jax.models import autoencoder as vae_model

    folder = str(tmp_path / "flux")
    shutil.copytree(tiny_folder, folder, ignore=shutil.ignore_patterns("again"))
    # BFL files carry no config: FLUX.1's 32 groups are assumed, so widths of 32 here.
    config = vae_model.tiny_autoencoder_config(block_out_channels=(32, 32), norm_num_groups=32)
    shutil.rmtree(os.path.join(folder, "vae"))
    flux_folder.save_vae_folder(os.path.join(folder, "vae"), config, flux_folder.random_params(
        vae_model.abstract_params(config), 1))
    pipe = load_flux_pipeline(folder, components=["vae"])
    levels = len(pipe.vae.block_out_channels)
    tensors = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(pipe.params["vae"])[0]:
        names = tuple(p.key for p in path)
        leaf = np.asarray(leaf)
        torch_leaf = leaf.transpose(3, 2, 0, 1) if leaf.ndim == 4 else leaf.T
        if names[-2] in ("to_q", "to_k", "to_v", "to_out") and names[-1] == "kernel":
            # BFL stores the attention projections as 1x1 convs
            torch_leaf = torch_leaf[:, :, None, None]
        tensors[flax_to_bfl(names, levels)] = np.ascontiguousarray(torch_leaf)
    shutil.rmtree(os.path.join(folder, "vae"))
    save_file(tensors, os.path.join(folder, "ae.safetensors"))
    packed = np.random.default_rng(0).standard_normal((1, 64, 16)).astype(np.float32)
    expected = np.asarray(pipe.decode(packed, SIZE, SIZE))
    bfl = load_flux_pipeline(folder, components=["vae"])
    np.testing.assert_allclose(np.asarray(bfl.decode(packed, SIZE, SIZE)), expected, atol=1e-6)
    moved = str(tmp_path / "ae_elsewhere.safetensors")
    shutil.move(os.path.join(folder, "ae.safetensors"), moved)
    other = load_flux_pipeline(folder, components=["vae"], vae_path=moved)
    np.testing.assert_allclose(np.asarray(other.decode(packed, SIZE, SIZE)), expected,
                               atol=1e-6)


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def broken(tiny_folder, tmp_path):
    """A fresh copy of the tiny folder to damage."""
    folder = str(tmp_path / "flux")
    shutil.copytree(tiny_folder, folder, ignore=shutil.ignore_patterns("again"))
    return folder


def first_line(err: pytest.ExceptionInfo) -> str:
    return str(err.value).split("\n")[0]


def test_missing_component(broken):
    shutil.rmtree(os.path.join(broken, "text_encoder_2"))
    with pytest.raises(FileNotFoundError) as err:
        load_flux_pipeline(broken)
    line = first_line(err)
    assert os.path.join(broken, "text_encoder_2", "config.json") in line
    assert "T5 text encoder" in line and "download" in line
    # Without the T5 component the rest still loads.
    pipe = load_flux_pipeline(broken, components=["transformer", "clip", "vae"])
    assert "t5" not in pipe.params
    with pytest.raises(ValueError, match="needs the t5 component"):
        pipe.encode_prompts(["a cat"])


def test_missing_tokenizer_files(broken):
    os.remove(os.path.join(broken, "tokenizer_2", "tokenizer.json"))
    with pytest.raises(FileNotFoundError) as err:
        load_flux_pipeline(broken)
    line = first_line(err)
    assert os.path.join(broken, "tokenizer_2") in line
    assert "tokenizer.json or spiece.model" in line and "download" in line


def test_missing_tensor_names_file_and_key(broken):
    file = os.path.join(broken, "vae", "diffusion_pytorch_model.safetensors")
    tensors = load_file(file)
    key = "decoder.mid_block.attentions.0.to_q.weight"
    del tensors[key]
    save_file(tensors, file)
    with pytest.raises(ValueError) as err:
        load_flux_pipeline(broken)
    line = first_line(err)
    assert line.startswith(file + ": missing tensor " + key)
    assert "in the VAE (vae/)" in line and "check the checkpoint" in line


def test_misshaped_tensor_in_a_shard_names_the_shard(broken):
    folder = os.path.join(broken, "text_encoder_2")
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    shard = os.path.join(folder, index["weight_map"][key])
    tensors = load_file(shard)
    tensors[key] = tensors[key][:, :-1].copy()
    save_file(tensors, shard)
    with pytest.raises(ValueError) as err:
        load_flux_pipeline(broken)
    line = first_line(err)
    assert line.startswith(f"{shard}: wrong shape tensor {key}")
    assert "expected (32, 48), found (32, 47)" in line and "T5 text encoder" in line
    assert "pass a transformers T5 encoder folder" in line


@pytest.mark.parametrize("change, match", [
    ({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]},
     r"_class_name is 'StableDiffusionPipeline', not a FLUX.1 pipeline"),
    ({"transformer": ["diffusers", "SD3Transformer2DModel"]},
     r"transformer is 'SD3Transformer2DModel', not FluxTransformer2DModel"),
    ({"text_encoder_2": None}, r"no 'text_encoder_2' entry"),
])
def test_wrong_family(broken, change, match):
    file = os.path.join(broken, "model_index.json")
    index = json.load(open(file))
    for key, value in change.items():
        if value is None:
            del index[key]
        else:
            index[key] = value
    json.dump(index, open(file, "w"))
    with pytest.raises(ValueError) as err:
        load_flux_pipeline(broken)
    line = first_line(err)
    assert line.startswith(file + ": ") and re.search(match, line)
    assert "pass a FLUX.1 folder" in line or "download" in line


def test_not_a_pipeline_folder(broken):
    with pytest.raises(FileNotFoundError, match="model_index.json not found"):
        load_flux_pipeline(os.path.join(broken, "transformer"))
    with pytest.raises(FileNotFoundError, match="pipeline folder not found"):
        load_flux_pipeline(os.path.join(broken, "nothing"))


def test_components_from_different_models(broken):
    """A CLIP of another width (weights and config agree) does not fit the transformer."""
    from leapalign_jax.models import clip as clip_model

    config = clip_model.CLIPTextConfig(vocab_size=560, hidden_size=8, intermediate_size=16,
                                       num_layers=1, num_heads=2)
    folder = os.path.join(broken, "text_encoder")
    shutil.rmtree(folder)
    flux_folder.save_clip_text_folder(folder, config, flux_folder.random_params(
        clip_model.abstract_params(config), 0))
    with pytest.raises(ValueError) as err:
        load_flux_pipeline(broken, components=["transformer", "clip"])
    line = first_line(err)
    assert line.startswith(os.path.join(broken, "transformer", "config.json"))
    assert "vec_in_dim (pooled_projection_dim) is 16" in line and "hidden_size 8" in line


def test_scheduler_options(broken):
    file = os.path.join(broken, "scheduler", "scheduler_config.json")
    cfg = json.load(open(file))
    json.dump(cfg | {"use_karras_sigmas": True}, open(file, "w"))
    with pytest.raises(ValueError, match="use_karras_sigmas is set"):
        load_flux_pipeline(broken, components=["vae"])
    json.dump(cfg | {"_class_name": "EulerDiscreteScheduler"}, open(file, "w"))
    with pytest.raises(ValueError, match="not FlowMatchEulerDiscreteScheduler"):
        load_flux_pipeline(broken, components=["vae"])


def test_bad_call_arguments(pipes):
    ours, ref = pipes
    with pytest.raises(ValueError, match="max_sequence_length 513"):
        ours.encode_prompts(["a cat"], max_sequence_length=513)
    with pytest.raises(ValueError, match="not packed latents"):
        ours.decode(np.zeros((1, 10, 16), np.float32), SIZE, SIZE)
    with pytest.raises(ValueError, match="not packed latents"):
        ours.sample(["a", "b"], height=SIZE, width=SIZE, latents=packed_noise(ref, 1),
                    num_steps=1, max_sequence_length=SEQ)
