"""FLUX.1 VAE: parity with diffusers' torch AutoencoderKL, both checkpoint layouts, errors.

Tiny random torch models (every parameter randomised, norms included) are saved in the
real layouts; our loader reads them and the Flax model must match torch's encode
(latent mean / logvar), decode and the decoder's gradient in float32.
"""

import dataclasses
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from leapalign_jax.models.autoencoder import (AutoencoderConfig, AutoencoderKL,  # noqa: E402
                                              tiny_autoencoder_config)
from leapalign_jax.weights.autoencoder import (load_autoencoder,  # noqa: E402
                                               read_autoencoder_config)

# Two tiny variants: quant convs, 2 levels, 2 layers; no quant convs, 3 levels, 16 latent ch.
VARIANTS = {
    "quant": dict(block_out_channels=(8, 16), layers_per_block=2, latent_channels=4,
                  use_quant_conv=True, use_post_quant_conv=True, size=16),
    "flux_like": dict(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=16,
                      use_quant_conv=False, use_post_quant_conv=False, size=16),
}
GROUPS = 4
REL_TOL = 1e-4


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def torch_vae(spec: dict, seed: int = 0):
    """A diffusers AutoencoderKL with every parameter randomised."""
    torch.manual_seed(seed)
    n = len(spec["block_out_channels"])
    model = diffusers.AutoencoderKL(
        block_out_channels=spec["block_out_channels"], layers_per_block=spec["layers_per_block"],
        latent_channels=spec["latent_channels"], norm_num_groups=GROUPS,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        use_quant_conv=spec["use_quant_conv"], use_post_quant_conv=spec["use_post_quant_conv"],
        scaling_factor=0.3611, shift_factor=0.1159)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) * 1.2 / fan_in ** 0.5)
    return model.eval()


def save(name: str, root) -> tuple[dict, object, str]:
    """(spec, torch model, pipeline folder whose vae/ holds the saved model)."""
    spec = VARIANTS[name]
    model = torch_vae(spec)
    model.save_pretrained(os.path.join(root, "vae"), safe_serialization=True)
    return spec, model, str(root)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved(request, tmp_path_factory):
    return save(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def quant(tmp_path_factory):
    """The "quant" variant alone, for checks one variant is enough for."""
    return save("quant", tmp_path_factory.mktemp("quant_only"))


def inputs(spec: dict, seed: int = 1):
    """Images (NCHW, [-1, 1]), latents (NCHW) and output weights w (NHWC)."""
    rng = np.random.default_rng(seed)
    s, f = spec["size"], 2 ** (len(spec["block_out_channels"]) - 1)
    images = rng.uniform(-1, 1, (2, 3, s, s)).astype(np.float32)
    z = rng.normal(size=(2, spec["latent_channels"], s // f, s // f)).astype(np.float32)
    w = rng.normal(size=(2, s, s, 3)).astype(np.float32)
    return images, z, w


def nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def torch_outputs(model, images, z, w):
    """Torch's (mean, logvar, decoded, d sum(decoded * w) / dz), channels-last."""
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(images)).latent_dist
    zt = torch.from_numpy(z).requires_grad_(True)
    decoded = model.decode(zt).sample
    (decoded * torch.from_numpy(np.transpose(w, (0, 3, 1, 2)))).sum().backward()
    return nhwc(dist.mean), nhwc(dist.logvar), nhwc(decoded.detach()), nhwc(zt.grad)


@functools.lru_cache(maxsize=None)
def jax_fn(config: AutoencoderConfig):
    """One jitted function per config (one compile): encode, decode and the decoder's
    gradient of sum(decoded * w) w.r.t. the latent."""
    model = AutoencoderKL(config)

    def run(params, images, z, w):
        mean, logvar = model.apply({"params": params}, images, method="encode")

        def loss(z):
            decoded = model.apply({"params": params}, z, method="decode")
            return jnp.sum(decoded * w), decoded

        (_, decoded), grad = jax.value_and_grad(loss, has_aux=True)(z)
        return mean, logvar, decoded, grad

    return jax.jit(run)


def jax_outputs(config, params, images, z, w):
    return jax_fn(config)(params, nhwc(images), nhwc(z), w)


def check_parity(config, params, model, spec, label):
    images, z, w = inputs(spec)
    ref = torch_outputs(model, images, z, w)
    ours = jax_outputs(config, params, images, z, w)
    for name, a, b, tol in zip(("mean", "logvar", "decode", "decoder gradient"), ours, ref,
                               (REL_TOL,) * 3 + (1e-3,)):
        assert a.shape == b.shape, (label, name, a.shape, b.shape)
        err = rel_err(a, b)
        print(f"{label} {name}: relative error {err:.2e}")
        assert err <= tol, (label, name, err)
    return ours


# ----------------------------------------------------------------------------- parity


def test_diffusers_folder_parity(saved):
    spec, model, root = saved
    config, params = load_autoencoder(root)  # the pipeline folder holding vae/
    assert config.block_out_channels == spec["block_out_channels"]
    assert config.latent_channels == spec["latent_channels"]
    assert (config.use_quant_conv, config.use_post_quant_conv) == (
        spec["use_quant_conv"], spec["use_post_quant_conv"])
    assert (config.scaling_factor, config.shift_factor) == (0.3611, 0.1159)
    assert ("quant_conv" in params) == spec["use_quant_conv"]
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    check_parity(config, params, model, spec, f"diffusers {spec['block_out_channels']}")


def test_remat_same_outputs_and_gradients(quant):
    spec, _, root = quant
    config, params = load_autoencoder(root)
    images, z, w = inputs(spec)
    plain = jax_outputs(config, params, images, z, w)
    for remat in ("full", "dots_saveable"):
        rematted = jax_outputs(dataclasses.replace(config, remat=remat), params, images, z, w)
        for name, a, b in zip(("mean", "logvar", "decode", "gradient"), rematted, plain):
            # float32 sums in another order (1e-6 is about 8 ulps); a remat bug is O(1)
            assert rel_err(a, b) <= 1e-5, (remat, name)


def test_bfloat16_compute_close(quant):
    spec, model, root = quant
    config, params = load_autoencoder(root)
    images, z, w = inputs(spec)
    ref = torch_outputs(model, images, z, w)
    ours = jax_outputs(dataclasses.replace(config, dtype="bfloat16"), params, images, z, w)
    assert all(o.dtype == jnp.float32 for o in ours)
    errs = [rel_err(a, b) for a, b in zip(ours, ref)]
    print(f"bfloat16 compute relative errors (mean, logvar, decode, grad): {errs}")
    assert max(errs) < 0.05


# ----------------------------------------------------------------------------- BFL layout


def diffusers_to_bfl(key: str, num_levels: int) -> str:
    """The LDM / BFL name of a diffusers AutoencoderKL key (the inverse of diffusers'
    convert_ldm_vae_checkpoint)."""
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.",
                 key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.",
                 r"encoder.down.\1.downsample.", key)

    def up(m):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.{m[2]}"

    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets\.\d+\.|upsamplers\.0\.)", up, key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    key = key.replace(".resnets.", ".block.").replace(".upsamplers.0.", ".upsample.")
    key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
    for old, new in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."),
                     ("to_v.", "v."), ("to_out.0.", "proj_out.")):
        key = key.replace("attn_1." + old, "attn_1." + new)
    return key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")


def write_bfl(model, file: str, num_levels: int) -> dict:
    tensors = {}
    for key, value in model.state_dict().items():
        array = value.detach().numpy().copy()
        bfl = diffusers_to_bfl(key, num_levels)
        if ".attn_1." in bfl and bfl.endswith("weight") and array.ndim == 2:
            array = array[:, :, None, None]  # BFL stores the attention linears as 1x1 convs
        assert bfl not in tensors, bfl
        tensors[bfl] = array
    save_file(tensors, file)
    return tensors


def test_bfl_single_file_parity(saved, tmp_path):
    spec, model, _ = saved
    n = len(spec["block_out_channels"])
    file = str(tmp_path / "ae.safetensors")
    tensors = write_bfl(model, file, n)
    assert "decoder.up.0.block.0.conv1.weight" in tensors
    assert tensors["encoder.mid.attn_1.q.weight"].ndim == 4
    config, params = load_autoencoder(file, norm_num_groups=GROUPS)
    assert config == read_autoencoder_config(file, norm_num_groups=GROUPS)
    assert config.block_out_channels == spec["block_out_channels"]
    assert config.layers_per_block == spec["layers_per_block"]
    assert config.use_quant_conv == spec["use_quant_conv"]
    check_parity(config, params, model, spec, f"bfl {spec['block_out_channels']}")


def test_flux_vae_layouts_match_diffusers_and_its_converter():
    """At FLUX.1 size: our diffusers keys and shapes are exactly diffusers' model's, and
    diffusers' own converter (convert_ldm_vae_checkpoint) maps our BFL keys onto them."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from leapalign_jax.models.autoencoder import FLUX_VAE
    from leapalign_jax.weights.autoencoder import _layout
    with torch.device("meta"):  # shapes only
        model = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            use_quant_conv=False, use_post_quant_conv=False)
    ref = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert dict(_layout(FLUX_VAE, "diffusers").values()) == ref

    bfl = dict(_layout(FLUX_VAE, "bfl").values())
    assert bfl["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert bfl["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in bfl
    as_stored = {key: torch.empty(shape + (1, 1) if ".attn_1." in key and len(shape) == 2
                                  else shape, device="meta") for key, shape in bfl.items()}
    converted = convert_ldm_vae_checkpoint(as_stored, dict(model.config))
    assert {key: tuple(value.shape) for key, value in converted.items()} == ref


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def small_folder(tmp_path):
    model = torch_vae(VARIANTS["quant"])
    folder = tmp_path / "vae"
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_wrong_class_is_one_line(small_folder):
    cfg_file = small_folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["_class_name"] = "AutoencoderTiny"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        load_autoencoder(small_folder)
    msg = str(err.value)
    assert "\n" not in msg and str(cfg_file) in msg and "AutoencoderTiny" in msg
    assert "AutoencoderKL" in msg


def test_missing_and_misshaped_tensors_listed(small_folder):
    file = small_folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(file))
    del tensors["decoder.conv_out.bias"]
    tensors["encoder.conv_in.weight"] = np.zeros((8, 3, 5, 5), np.float32)
    save_file(tensors, str(file))
    with pytest.raises(ValueError) as err:
        load_autoencoder(small_folder)
    msg = str(err.value)
    assert msg.splitlines()[0].startswith(str(small_folder))
    assert "missing decoder.conv_out.bias" in msg
    assert "wrong shape encoder.conv_in.weight: expected (8, 3, 3, 3), found (8, 3, 5, 5)" in msg


def test_quant_conv_flag_mismatch_reported(small_folder):
    cfg_file = small_folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["use_quant_conv"] = False
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unexpected quant_conv.weight"):
        load_autoencoder(small_folder)


def test_bfl_wrong_family_is_one_line(tmp_path):
    file = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": np.zeros((6, 2), np.float32)}, str(file))
    with pytest.raises(ValueError) as err:
        load_autoencoder(file)
    msg = str(err.value)
    assert "\n" not in msg and str(file) in msg and "not the VAE" in msg


def test_bfl_groups_must_divide(quant, tmp_path):
    spec, model, _ = quant
    file = str(tmp_path / "ae.safetensors")
    write_bfl(model, file, len(spec["block_out_channels"]))
    with pytest.raises(ValueError, match="pass norm_num_groups"):
        load_autoencoder(file)  # FLUX.1's 32 groups do not divide width 8


def test_missing_path_and_config():
    with pytest.raises(FileNotFoundError, match="VAE weights not found"):
        load_autoencoder("/nonexistent/vae")


def test_config_validation():
    with pytest.raises(ValueError, match="norm_num_groups 3 does not divide"):
        tiny_autoencoder_config(norm_num_groups=3)
    with pytest.raises(ValueError, match="unknown remat"):
        AutoencoderConfig(remat="some")
