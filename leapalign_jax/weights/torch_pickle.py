"""Reading `torch.save` checkpoints without torch and without running arbitrary pickles.

Some reward checkpoints only exist as torch pickles (`HPS_v2.1_compressed.pt`, the LAION
aesthetic head `sac+logos+ava1-l14-linearMSE.pth`). torch is not a runtime dependency, so
this module reads them directly:

- the zip format (torch >= 1.6): `<archive>/data.pkl` is a pickle whose persistent ids
  `("storage", <storage type>, <key>, <location>, <numel>)` name raw little-endian storages
  stored as `<archive>/data/<key>` (uncompressed, so they are memory-mapped);
- the legacy format (`_use_new_zipfile_serialization=False`): magic number, protocol,
  system info, the object pickle, the list of storage keys, then each storage as an int64
  element count followed by its bytes.

The unpickler resolves only the globals a tensor checkpoint uses (`_rebuild_tensor_v2`,
`_rebuild_parameter`, `OrderedDict`, the storage types, `torch.device`, dtypes, ...); any
other global is an error, so a malicious file can not execute code. Tensors are numpy
views of the storages with torch's sizes, strides and offsets (fp16 -> float16, bf16 ->
ml_dtypes.bfloat16); `TorchTensors.read` returns a contiguous copy of one tensor.
"""

from __future__ import annotations

import codecs
import collections
import io
import mmap
import os
import pickle
import struct
import zipfile
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from leapalign_jax.weights.files import Shapes

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage type / dtype name -> (numpy dtype, safetensors-style dtype name)
_DTYPES: dict[str, tuple[np.dtype, str]] = {
    "Float": (np.dtype(np.float32), "F32"),
    "Double": (np.dtype(np.float64), "F64"),
    "Half": (np.dtype(np.float16), "F16"),
    "BFloat16": (np.dtype(ml_dtypes.bfloat16), "BF16"),
    "Long": (np.dtype(np.int64), "I64"),
    "Int": (np.dtype(np.int32), "I32"),
    "Short": (np.dtype(np.int16), "I16"),
    "Char": (np.dtype(np.int8), "I8"),
    "Byte": (np.dtype(np.uint8), "U8"),
    "Bool": (np.dtype(np.bool_), "BOOL"),
}
_TORCH_DTYPE_NAMES = {
    "float32": "Float", "float": "Float", "float64": "Double", "double": "Double",
    "float16": "Half", "half": "Half", "bfloat16": "BFloat16", "int64": "Long",
    "long": "Long", "int32": "Int", "int": "Int", "int16": "Short", "short": "Short",
    "int8": "Char", "uint8": "Byte", "bool": "Bool",
}


class TorchPickleError(ValueError):
    """A torch.save file that cannot be read safely (corrupt, or holding foreign objects)."""


# ----------------------------------------------------------------------------- pickle


class _StorageType(NamedTuple):
    """`torch.FloatStorage` & co. (or a torch dtype): names an element type."""
    name: str  # a key of _DTYPES; "Byte" for UntypedStorage


class _Storage(NamedTuple):
    """A persistent storage reference: key of its bytes, element type, element count."""
    key: str
    kind: str
    numel: int
    byte_offset: int = 0  # legacy views into a larger storage


class _TensorRef(NamedTuple):
    """A tensor as torch rebuilds it: a strided view of a storage."""
    storage: _Storage
    kind: str  # element type (differs from the storage's for untyped storages)
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: _Storage, storage_offset: int, size: Any, stride: Any,
                    *_: Any) -> _TensorRef:
    return _TensorRef(storage, storage.kind, int(storage_offset), tuple(int(s) for s in size),
                      tuple(int(s) for s in stride))


def _rebuild_tensor_v3(storage: _Storage, storage_offset: int, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any, dtype: _StorageType,
                       *_: Any) -> _TensorRef:
    ref = _rebuild_tensor(storage, storage_offset, size, stride)
    return ref._replace(kind=dtype.name)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.serialization", "_get_layout"): str,
        ("torch", "device"): _device,
        ("torch", "Size"): tuple,
        ("torch", "UntypedStorage"): _StorageType("Byte"),
        ("_codecs", "encode"): codecs.encode,  # bytes under pickle protocol 2
    }
    for name in _DTYPES:
        allowed[("torch", f"{name}Storage")] = _StorageType(name)
    for name, kind in _TORCH_DTYPE_NAMES.items():
        allowed[("torch", name)] = _StorageType(kind)
    return allowed


_ALLOWED = _allowed_globals()


class _Unpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED` globals; storages become `_Storage` references."""

    def __init__(self, data: io.BufferedIOBase, source: str):
        super().__init__(data)
        self.source = source
        self.kinds: dict[str, str] = {}  # storage key -> element type, as first referenced

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise TorchPickleError(
                f"{self.source}: refuses to load global {module}.{name}: only tensors, dicts "
                "and plain values are read from torch pickles; re-save a plain state_dict "
                "(or convert it to safetensors)") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or not pid:
            raise TorchPickleError(f"{self.source}: unknown persistent id {pid!r}")
        typename = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
        if typename != "storage" or len(pid) not in (5, 6):
            raise TorchPickleError(f"{self.source}: unsupported persistent id {typename!r} "
                                   "(not a tensor storage); re-save a plain state_dict")
        storage_type, key, _, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise TorchPickleError(f"{self.source}: unknown storage type {storage_type!r}")
        storage = _Storage(str(key), storage_type.name, int(numel))
        self.kinds.setdefault(storage.key, storage.kind)
        view = pid[5] if len(pid) == 6 else None
        if view is not None:  # legacy views: (view key, offset, size) in elements
            _, offset, size = view
            itemsize = _DTYPES[storage.kind][0].itemsize
            storage = storage._replace(numel=int(size), byte_offset=int(offset) * itemsize)
        return storage


def _unpickle(data: bytes | io.BufferedIOBase, source: str) -> Any:
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return _Unpickler(stream, source).load()
    except TorchPickleError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of a corrupt pickle
        raise TorchPickleError(f"{source}: the pickle is unreadable ({type(err).__name__}: "
                               f"{err}); the file is truncated or corrupt, re-download it") \
            from err


# ----------------------------------------------------------------------------- files


def _zip_storages(source: str, archive: zipfile.ZipFile,
                  size: int) -> tuple[Any, dict[str, tuple[int, int]], str]:
    """(the object pickle's result, storage key -> (file offset, nbytes), byte order)."""
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pickles:
        raise TorchPickleError(f"{source}: a zip without data.pkl is not a torch.save file "
                               "(a TorchScript archive?); save a state_dict with torch.save")
    root = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if root + "byteorder" in names:
        byteorder = archive.read(root + "byteorder").decode().strip()
    obj = _unpickle(archive.read(pickles[0]), source)
    where = {}
    for info in archive.infolist():
        if not info.filename.startswith(root + "data/"):
            continue
        if info.compress_type != zipfile.ZIP_STORED:
            raise TorchPickleError(f"{source}: storage {info.filename} is compressed; torch "
                                   "stores them uncompressed, re-save the file with torch.save")
        # local header: 30 bytes, then the name and the extra field, then the data
        with archive.open(info) as _:
            pass  # validates the local header
        archive.fp.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", archive.fp.read(4))
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > size:
            raise TorchPickleError(f"{source}: storage {info.filename} runs past the end of "
                                   "the file; it is truncated, re-download it")
        where[info.filename[len(root) + len("data/"):]] = (start, info.file_size)
    return obj, where, byteorder


def _legacy_storages(source: str, f: io.BufferedIOBase,
                     size: int) -> tuple[Any, dict[str, tuple[int, int]], str]:
    """The legacy format: header pickles, object pickle, key list, then the storages."""
    magic = _unpickle(f, source)
    if magic != _LEGACY_MAGIC:
        raise TorchPickleError(f"{source}: not a torch.save file (neither a zip archive nor a "
                               "legacy torch pickle); check the path")
    if _unpickle(f, source) != _LEGACY_PROTOCOL:
        raise TorchPickleError(f"{source}: unsupported legacy torch pickle protocol")
    info = _unpickle(f, source)
    byteorder = "little" if not isinstance(info, dict) or info.get("little_endian", True) \
        else "big"
    unpickler = _Unpickler(f, source)
    try:
        obj = unpickler.load()
    except TorchPickleError:
        raise
    except Exception as err:  # noqa: BLE001
        raise TorchPickleError(f"{source}: the pickle is unreadable ({err}); the file is "
                               "truncated or corrupt, re-download it") from err
    keys = _unpickle(f, source)
    where = {}
    for key in keys:
        head = f.read(8)
        if len(head) < 8:
            raise TorchPickleError(f"{source}: storage {key} is missing; the file is "
                                   "truncated, re-download it")
        numel = struct.unpack("<q" if byteorder == "little" else ">q", head)[0]
        nbytes = numel * _DTYPES[unpickler.kinds.get(str(key), "Byte")][0].itemsize
        start = f.tell()
        if start + nbytes > size:
            raise TorchPickleError(f"{source}: storage {key} runs past the end of the file; "
                                   "it is truncated, re-download it")
        f.seek(nbytes, os.SEEK_CUR)
        where[str(key)] = (start, nbytes)
    return obj, where, byteorder


def _state_dict(obj: Any, source: str) -> dict[str, _TensorRef]:
    """The tensors of a checkpoint: `obj` itself or its "state_dict" entry (nested
    "state_dict"s unwrapped), non-tensor entries dropped, a `module.` prefix stripped."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise TorchPickleError(f"{source}: holds a {type(obj).__name__}, not a state dict; "
                               "save model.state_dict() with torch.save")
    tensors = {}
    for key, value in obj.items():
        if isinstance(value, _TensorRef):
            key = str(key)
            tensors[key[len("module."):] if key.startswith("module.") else key] = value
    if not tensors:
        raise TorchPickleError(f"{source}: no tensors at the top level or under "
                               f"'state_dict' (keys: {list(obj)[:8]}); save model.state_dict()")
    return tensors


class TorchTensors:
    """The tensors of one `torch.save` file, read one at a time from a memory map.

    The same interface as `leapalign_jax.weights.files.Tensors` (`shapes`, `dtypes`,
    `key in tensors`, `read(key)`), so the key-table loaders read torch pickles unchanged.
    Use as a context manager, or call `close()`.

    Raises:
      FileNotFoundError: `file` does not exist.
      TorchPickleError (a ValueError): the file is truncated, corrupt, not a torch.save
        file, or its pickle names a global outside the allowed set. One line naming the file.
    """

    def __init__(self, file: str | os.PathLike):
        file = os.fspath(file)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"torch checkpoint not found: {file}")
        self.file = file
        self._f = open(file, "rb")
        try:
            size = os.fstat(self._f.fileno()).st_size
            head = self._f.read(4)
            self._f.seek(0)
            if head.startswith(b"PK"):  # a zip archive (its directory is at the end)
                try:
                    with zipfile.ZipFile(self._f) as archive:
                        obj, self._where, byteorder = _zip_storages(file, archive, size)
                except (zipfile.BadZipFile, EOFError, OSError, struct.error) as err:
                    raise TorchPickleError(f"{file}: unreadable zip archive ({err}); the file is "
                                           "truncated or corrupt, re-download it") from err
            elif head.startswith(b"\x80"):  # a pickle: the legacy format
                obj, self._where, byteorder = _legacy_storages(file, self._f, size)
            else:
                raise TorchPickleError(f"{file}: not a torch.save file (neither a zip archive "
                                       "nor a pickle); check the path")
            self._refs = _state_dict(obj, file)
            self._order = "<" if byteorder == "little" else ">"
            self._map = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except BaseException:
            self._f.close()
            raise
        self.shapes: Shapes = {k: r.shape for k, r in self._refs.items()}
        self.dtypes: dict[str, str] = {k: _DTYPES[r.kind][1] for k, r in self._refs.items()}

    def __contains__(self, key: str) -> bool:
        return key in self._refs

    def keys(self) -> list[str]:
        return list(self._refs)

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a contiguous numpy array in its stored dtype."""
        ref = self._refs[key]
        dtype = _DTYPES[ref.kind][0]
        storage = ref.storage
        if storage.key not in self._where:
            raise TorchPickleError(f"{self.file}: tensor {key} names storage {storage.key}, "
                                   "which the file lacks; it is corrupt, re-download it")
        start, nbytes = self._where[storage.key]
        start, nbytes = start + storage.byte_offset, nbytes - storage.byte_offset
        count = nbytes // dtype.itemsize
        extent = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) + 1
        if any(n == 0 for n in ref.shape):
            return np.zeros(ref.shape, dtype)
        if ref.offset < 0 or min(ref.stride, default=0) < 0 or extent > count:
            raise TorchPickleError(f"{self.file}: tensor {key} {ref.shape} reaches past its "
                                   "storage; the file is corrupt, re-download it")
        # unsigned ints of the same width carry the byte order; then view as the real dtype
        raw = np.dtype(f"{self._order}u{dtype.itemsize}") if dtype.itemsize > 1 else np.uint8
        flat = np.frombuffer(self._map, raw, count, start)
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset:], ref.shape, tuple(s * dtype.itemsize for s in ref.stride),
            writeable=False)
        out = np.empty(ref.shape, np.dtype(raw).newbyteorder("="))
        out[...] = view
        return out.view(dtype)

    def close(self) -> None:
        if isinstance(self._map, mmap.mmap):
            self._map.close()
        self._f.close()

    def __enter__(self) -> "TorchTensors":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_torch_file(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a `torch.save` state dict: key -> numpy array (stored dtype).

    `{"state_dict": {...}}` wrappers are unwrapped, a `module.` prefix (DataParallel) is
    stripped and non-tensor entries are dropped. Errors as `TorchTensors`.
    """
    with TorchTensors(file) as tensors:
        return {key: tensors.read(key) for key in tensors.keys()}
