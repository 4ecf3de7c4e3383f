"""The torch-free reader of `torch.save` files: values written by real torch read back
exactly; foreign globals, truncated and non-torch files give one-line errors."""

import collections
import os

import numpy as np
import pytest

from leapalign_jax.weights.torch_pickle import TorchPickleError, TorchTensors, load_torch_file


def _numpy(tensor):
    """torch tensor -> numpy in the dtype the reader should return (bf16 as ml_dtypes)."""
    import ml_dtypes
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy().astype(ml_dtypes.bfloat16)
    return tensor.numpy()


def _tensors():
    """Every case the reader must handle: dtypes, views with offsets and strides, 0-d."""
    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=g)
    shared = torch.randn(4, 8, generator=g)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(3, 4, generator=g).half(),
        "bf16": torch.randn(2, 3, 5, generator=g).bfloat16(),
        "f64": torch.randn(3, generator=g).double(),
        "i64": torch.arange(-3, 7),
        "i32": torch.arange(4, dtype=torch.int32),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "base": base,
        "transposed": base.t(),  # shares base's storage, strides (1, 6)
        "slice": base[1:4, 2:5],  # storage offset 8, non-contiguous
        "strided": base[::2, ::3],
        "shared_a": shared[:2],  # two views of one storage
        "shared_b": shared[2:].t(),
        "conv": torch.randn(4, 3, 2, 2, generator=g).permute(0, 2, 3, 1),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_roundtrip_matches_torch(tmp_path, legacy):
    import torch

    tensors = _tensors()
    file = tmp_path / "ckpt.pt"
    torch.save(tensors, file, _use_new_zipfile_serialization=not legacy)
    out = load_torch_file(file)
    assert set(out) == set(tensors)
    for key, tensor in tensors.items():
        ref = _numpy(tensor)
        assert out[key].dtype == ref.dtype, key
        assert out[key].shape == ref.shape, key
        assert out[key].flags.c_contiguous, key
        np.testing.assert_array_equal(out[key].astype(np.float64), ref.astype(np.float64),
                                      err_msg=key)


def test_module_state_dict_nested_and_prefixed(tmp_path):
    """nn.Module state dicts (OrderedDict with _metadata), Parameters, {"state_dict": ...}
    wrappers (nested twice) with extra entries, and a DataParallel `module.` prefix."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).half()
    state = model.state_dict()
    prefixed = collections.OrderedDict((f"module.{k}", v) for k, v in state.items())
    file = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"state_dict": prefixed, "step": 7}, "epoch": 3,
                "name": "x", "blob": b"\x00\x01"}, file)
    out = load_torch_file(file)
    assert set(out) == set(state)
    for key, tensor in state.items():
        assert out[key].dtype == np.float16
        np.testing.assert_array_equal(out[key], tensor.numpy())

    params = {"w": torch.nn.Parameter(torch.randn(2, 3)), "b": torch.nn.Parameter(torch.ones(2))}
    torch.save(params, tmp_path / "params.pt")
    out = load_torch_file(tmp_path / "params.pt")
    np.testing.assert_array_equal(out["w"], params["w"].detach().numpy())


def test_lazy_shapes_and_dtypes(tmp_path):
    import torch

    torch.save({"a": torch.zeros(2, 3).bfloat16(), "b": torch.ones(4).half()}, tmp_path / "x.pt")
    with TorchTensors(tmp_path / "x.pt") as tensors:
        assert tensors.shapes == {"a": (2, 3), "b": (4,)}
        assert tensors.dtypes == {"a": "BF16", "b": "F16"}
        assert "a" in tensors and "c" not in tensors
        np.testing.assert_array_equal(tensors.read("b"), np.ones(4, np.float16))


class _Evil:
    """Pickles as a call to os.system: a reader that ran it would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_disallowed_global_raises_without_running_it(tmp_path):
    import torch

    marker = tmp_path / "ran"
    file = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Evil(marker)}, file)
    with pytest.raises(TorchPickleError, match=r"refuses to load global (posix|os)\.system"):
        load_torch_file(file)
    assert not marker.exists()

    torch.save({"w": torch.ones(2), "c": collections.Counter("ab")}, file,
               _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="refuses to load global collections.Counter") as err:
        load_torch_file(file)
    assert "\n" not in str(err.value) and str(file) in str(err.value)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_truncated_file_one_line_error(tmp_path, legacy, fraction):
    import torch

    file = tmp_path / "full.pt"
    torch.save({"w": torch.randn(64, 64), "b": torch.randn(64)}, file,
               _use_new_zipfile_serialization=not legacy)
    data = file.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ValueError, match="truncated") as err:
        load_torch_file(cut)
    assert "\n" not in str(err.value) and str(cut) in str(err.value)


def test_not_a_torch_file_and_missing(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match="not a torch.save file") as err:
        load_torch_file(text)
    assert "\n" not in str(err.value) and str(text) in str(err.value)
    with pytest.raises(FileNotFoundError, match="torch checkpoint not found"):
        load_torch_file(tmp_path / "absent.pt")
