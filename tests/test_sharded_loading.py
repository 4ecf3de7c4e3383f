"""Streaming sharded loading (weights/sharded.py) on a simulated 8-device CPU mesh.

Every tensor of a tiny FLUX.1 folder (transformer, T5, VAE) is built on its shards
directly: each array carries its logical sharding, each device's shard is the right slice
of the unsharded loader's tensor, a sharded leaf's callback never returns the full tensor,
nothing goes through `jax.device_put`, and every checkpoint tensor is read exactly once.
XLA fixes the device count at start-up, so the checks run in one subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.devices import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(r"""
    import collections, dataclasses, functools, json, os, sys
    import flax, jax, ml_dtypes, numpy as np
    from leapalign_jax import parallel
    from leapalign_jax.models import flux as flux_model
    from leapalign_jax.weights import files, sharded
    from leapalign_jax.weights.autoencoder import load_autoencoder
    from leapalign_jax.weights.flux import load_flux, save_flux_bfl
    from leapalign_jax.weights.flux_folder import tiny_flux_configs, write_tiny_flux_folder
    from leapalign_jax.weights.t5 import load_t5

    assert jax.device_count() == 8, jax.devices()
    folder = sys.argv[1]
    # Two double and three single blocks, so the stacked layout has layers to stack.
    tiny = tiny_flux_configs()
    write_tiny_flux_folder(folder, seed=3, configs=dataclasses.replace(tiny, 
        transformer=flux_model.tiny_config(mlp_ratio=4.0, depth=2, depth_single_blocks=3)))

    # Spies: every callback's returned slice, device_put calls, tensor reads per key.
    calls, puts, reads = [], [], collections.Counter()
    make = jax.make_array_from_callback
    def spy_make(shape, sharding, callback, *args, **kwargs):
        record = {"shape": list(shape), "replicated": sharding.is_fully_replicated, "got": []}
        calls.append(record)
        def wrapped(index):
            out = callback(index)
            record["got"].append(list(out.shape))
            return out
        return make(shape, sharding, wrapped, *args, **kwargs)
    jax.make_array_from_callback = spy_make
    put = jax.device_put
    jax.device_put = lambda *a, **k: (puts.append(1), put(*a, **k))[1]
    tensor_read = files.Tensors.read
    def spy_read(self, key):
        reads[key] += 1
        return tensor_read(self, key)
    files.Tensors.read = spy_read

    def compare(name, params, reference, abstract, mesh, dtype):
        shardings = sharded.leaf_shardings(abstract, mesh)
        flat = flax.traverse_util.flatten_dict(params)
        ref = flax.traverse_util.flatten_dict(reference)
        assert flat.keys() == ref.keys() == shardings.keys(), name
        worst, split = 0.0, 0
        for path, array in flat.items():
            assert array.sharding == shardings[path], (name, path, array.sharding)
            assert array.dtype == dtype, (name, path, array.dtype)
            split += not array.sharding.is_fully_replicated
            want = np.asarray(ref[path]).astype(dtype)
            for shard in array.addressable_shards:
                got = np.asarray(shard.data)
                assert got.shape == want[shard.index].shape, (name, path)
                worst = max(worst, float(np.max(np.abs(got.astype(np.float32)
                                                        - want[shard.index].astype(np.float32)),
                                                 initial=0.0)))
        return {"max_err": worst, "split": split, "leaves": len(flat)}

    out = {}
    for shape in [(1, 8, 1), (2, 4, 1), (2, 2, 2)]:
        mesh = parallel.make_mesh(shape)
        for name, load, ref_load, abstract, kwargs in [
            ("flux", sharded.load_flux_sharded, load_flux, flux_model.abstract_params, {}),

            ("t5", sharded.load_t5_sharded, load_t5, None, {"dtype": "bfloat16"}),
            ("vae", sharded.load_autoencoder_sharded, load_autoencoder, None, {}),
        ] + ([  # the scan_blocks layout (blocks streamed into stacked leaves): one mesh
            ("flux_scan", functools.partial(sharded.load_flux_sharded, scan_blocks=True),
             functools.partial(load_flux, scan_blocks=True), None, {})]
             if shape == (2, 2, 2) else []):
            sub = {"flux": "transformer", "flux_scan": "transformer", "t5": "text_encoder_2",
                   "vae": "vae"}[name]
            calls.clear(); puts.clear(); reads.clear()
            config, params = load(os.path.join(folder, sub), mesh, **kwargs)
            record = dict(reads)
            n_calls, n_puts = list(calls), len(puts)
            dtype = np.dtype(ml_dtypes.bfloat16) if kwargs else np.dtype(np.float32)
            if name.startswith("flux"):
                assert config.scan_blocks == (name == "flux_scan")
                abs_tree = flux_model.abstract_params(config)
            elif name == "t5":
                from leapalign_jax.models.t5 import abstract_t5_params
                abs_tree = abstract_t5_params(config)
            else:
                from leapalign_jax.models.autoencoder import abstract_params
                abs_tree = abstract_params(config)
            ref_config, reference = ref_load(os.path.join(folder, sub))
            assert ref_config == config
            result = compare(name, params, reference, abs_tree, mesh, dtype)
            # A sharded leaf's callback returns a strict slice, never the full tensor.
            result["full_copies_of_split_leaves"] = sum(
                got == c["shape"] for c in n_calls if not c["replicated"] for got in c["got"])
            result["split_callbacks"] = sum(len(c["got"]) for c in n_calls if not c["replicated"])
            result["device_puts"] = n_puts
            result["max_reads_per_tensor"] = max(record.values())
            result["tensors_read"] = len(record)
            out[f"{name}{shape}"] = result

    # A bf16 BFL file becomes float32 master params (upcast), equal to the bf16 values.
    config, params = load_flux(os.path.join(folder, "transformer"))
    bf16_file = os.path.join(folder, "flux-bf16.safetensors")
    save_flux_bfl(bf16_file, config, params, dtype=ml_dtypes.bfloat16)
    mesh = parallel.make_mesh((1, 8, 1))
    _, up = sharded.load_flux_sharded(bf16_file, mesh, axes_dim=config.axes_dim)
    _, ref = load_flux(bf16_file, axes_dim=config.axes_dim)
    flat_up, flat_ref = (flax.traverse_util.flatten_dict(t) for t in (up, ref))
    out["bf16_upcast"] = {
        "dtypes": sorted({str(a.dtype) for a in flat_up.values()}),
        "max_err": max(float(np.max(np.abs(np.asarray(flat_up[k]) - flat_ref[k])))
                       for k in flat_ref)}

    # Readers that do not fit the model are one error naming the leaves.
    abstract = flux_model.abstract_params(config)
    with __import__("contextlib").ExitStack() as stack:
        from leapalign_jax.weights.flux import flux_readers
        _, readers = flux_readers(os.path.join(folder, "transformer"), stack)
        readers.pop(("img_in", "kernel"))
        try:
            sharded.load_sharded(readers, abstract, mesh, source="tiny")
            out["missing_error"] = None
        except ValueError as err:
            out["missing_error"] = str(err)
    # A stacked leaf needs every layer: a missing block is named with its layer.
    scanned = flux_model.abstract_params(flux_model.dataclasses.replace(config, scan_blocks=True))
    with __import__("contextlib").ExitStack() as stack:
        _, readers = flux_readers(os.path.join(folder, "transformer"), stack)
        readers.pop(("double_blocks_1", "img_attn", "qkv", "kernel"))
        try:
            sharded.load_sharded(readers, scanned, mesh, source="tiny",
                                 stacked=flux_model.stacked_path)
            out["missing_layer_error"] = None
        except ValueError as err:
            out["missing_layer_error"] = str(err)
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               JAX_PLATFORMS="cpu")
    folder = tmp_path_factory.mktemp("sharded") / "flux"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


# The stacked (scan_blocks) layout is loaded on the mesh that splits all three axes.
CASES = [(component, mesh) for component in ("flux", "t5", "vae")
         for mesh in ("(1, 8, 1)", "(2, 4, 1)", "(2, 2, 2)")] + [("flux_scan", "(2, 2, 2)")]


@pytest.mark.parametrize("component, mesh", CASES)
def test_each_shard_is_its_slice_of_the_file(results, component, mesh):
    r = results[component + mesh]
    # The array's sharding is the logical sharding, and each shard equals the unsharded
    # loader's tensor at the shard's index (bit-exact: same bytes, same cast).
    assert r["max_err"] == 0.0, r
    assert r["split"] >= r["leaves"] // 4, r  # many leaves really are split
    # No sharded leaf was ever materialised whole for one device; no device_put at all.
    assert r["split_callbacks"] > 0 and r["full_copies_of_split_leaves"] == 0, r
    assert r["device_puts"] == 0, r
    # Every checkpoint tensor is read once (fused parts share one read).
    assert r["max_reads_per_tensor"] == 1 and r["tensors_read"] > 0, r


def test_bf16_file_is_upcast_to_float32_master_params(results):
    r = results["bf16_upcast"]
    assert r["dtypes"] == ["float32"]
    assert r["max_err"] == 0.0


def test_readers_that_do_not_fit_the_model_are_one_error(results):
    message = results["missing_error"]
    assert message is not None and message.startswith("tiny: ")
    assert "img_in/kernel" in message.splitlines()[0]


def test_a_missing_layer_of_a_stacked_leaf_is_named(results):
    message = results["missing_layer_error"]
    assert message is not None and message.startswith("tiny: ")
    assert "double_blocks/block/img_attn/qkv/kernel[1]" in message.splitlines()[0]


def test_shard_reader_checks_the_tensor_shape():
    import jax

    from leapalign_jax import parallel
    from leapalign_jax.models import flux as flux_model
    from leapalign_jax.weights import sharded

    config = flux_model.tiny_config()
    abstract = flux_model.abstract_params(config)
    flat = {p: (lambda s=tuple(l.shape): np.zeros(s, np.float32))
            for p, l in __import__("flax").traverse_util.flatten_dict(
                __import__("flax").linen.meta.unbox(abstract)).items()}
    flat[("img_in", "kernel")] = lambda: np.zeros((3, 3), np.float32)
    mesh = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    with pytest.raises(ValueError, match=r"^ckpt: img_in/kernel has shape \(3, 3\)"):
        sharded.load_sharded(flat, abstract, mesh, source="ckpt")
