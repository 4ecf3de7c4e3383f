"""Prompt embeddings computed once (`task=embed`), so training never loads the text encoders.

FLUX.1 conditions on T5-XXL's sequence (`prompt_embeds`, (S, 4096) per prompt, S =
`max_sequence_length`) and CLIP-L's pooled output (768). T5-XXL is 4.7B parameters; with the
embeddings on disk it need not sit in device memory while the transformer trains.

Layout of an embeddings folder (`DIR/embeddings/`, written by `embed_prompts`):

    index.json                 version, the encoders' fingerprint, max_sequence_length,
                               widths, and the shards: [{"file", "keys"}] in writing order
    shard-00000.safetensors    "t5" (N, S, D) bfloat16, "clip" (N, P) float32; row i is the
    shard-00001.safetensors    prompt index["shards"][k]["keys"][i] (a `data.prompt_key`)

Embedding is resumable: prompts whose key is already in the index are skipped, and the
index is rewritten (atomically) after each shard, so an interrupted run loses at most the
shard it was writing. The fingerprint holds the file identity (`file_identity`: sizes
and hashes of the first and last MiB of every file) of text_encoder/,
text_encoder_2/, tokenizer/ and tokenizer_2/, plus `max_sequence_length`; reading an
index whose fingerprint differs from the folder's (or another length) is a one-line
error naming the fix. Components absent from the folder are not compared, so the text
encoders may be deleted once the prompts are embedded.

Files are local paths (rows are read by memory-mapping the shards).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from leapalign_jax import flux_pipeline, parallel, sampling

INDEX = "index.json"
SUBDIR = "embeddings"
VERSION = 1
ENCODER_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
TXT_DTYPE = ml_dtypes.bfloat16  # stored T5 sequences (FLUX.1's text encoder runs in bf16)
Y_DTYPE = np.float32

_log = logging.getLogger(__name__)


class StaleEmbeddings(ValueError):
    """Embeddings computed with other encoders or another sequence length."""


def file_identity(path: str) -> dict[str, Any]:
    """A cheap identity of a local file or folder: total bytes and a sha256 over every
    file's relative name, size and first and last MiB (headers, configs, data tails)."""
    if os.path.isfile(path):
        files = [(os.path.basename(path), path)]
    else:
        files = sorted((os.path.relpath(os.path.join(d, n), path), os.path.join(d, n))
                       for d, _, names in os.walk(path) for n in names)
    digest, total = hashlib.sha256(), 0
    for name, file in files:
        size = os.path.getsize(file)
        total += size
        digest.update(f"{name}\0{size}\0".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                digest.update(f.read())
    return {"bytes": total, "sha256_ends": digest.hexdigest()[:16]}


def encoder_fingerprint(folder: str, max_sequence_length: int) -> dict[str, Any]:
    """The identity of the folder's text encoders and tokenizers, and the length."""
    parts = {part: file_identity(os.path.join(folder, part))
             for part in ENCODER_PARTS if os.path.isdir(os.path.join(folder, part))}
    return {"max_sequence_length": int(max_sequence_length), "parts": parts}


def find_index(path: str) -> str:
    """The index.json of an embeddings folder given as the folder or the run dir above it."""
    for where in (os.path.join(path, SUBDIR, INDEX), os.path.join(path, INDEX)):
        if os.path.isfile(where):
            return where
    raise FileNotFoundError(f"no embeddings in {path} (no {SUBDIR}/{INDEX}); compute them "
                            "first with --config.task=embed --workdir DIR, then pass "
                            "--config.world.embeddings=DIR")


def _read_index(file: str) -> dict[str, Any]:
    with open(file, encoding="utf-8") as f:
        index = json.load(f)
    if index.get("version") != VERSION:
        raise StaleEmbeddings(f"{file}: embeddings format version {index.get('version')}, "
                              f"expected {VERSION}; recompute them with --config.task=embed "
                              "into a new DIR")
    return index


def _write_index(file: str, index: dict[str, Any]) -> None:
    tmp = file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f)
    os.replace(tmp, file)


def check_fingerprint(file: str, index: dict[str, Any], folder: str,
                      max_sequence_length: int) -> None:
    """Raises StaleEmbeddings (one line naming the fix) when `index` was computed with
    another length or with encoders that differ from those present in `folder`."""
    found = index["fingerprint"]
    fix = ("recompute them with --config.task=embed into a new DIR (or point "
           "--config.world.embeddings at embeddings of these encoders)")
    if found["max_sequence_length"] != int(max_sequence_length):
        raise StaleEmbeddings(
            f"{file}: stale embeddings: computed with max_sequence_length "
            f"{found['max_sequence_length']}, the config asks {max_sequence_length}; {fix}, or "
            f"set --config.world.max_sequence_length={found['max_sequence_length']}")
    current = encoder_fingerprint(folder, max_sequence_length)["parts"]
    changed = [part for part, ident in found["parts"].items()
               if part in current and current[part] != ident]
    if changed:
        raise StaleEmbeddings(f"{file}: stale embeddings: {', '.join(changed)} of {folder} "
                              f"differ from the encoders they were computed with; {fix}")


# ----------------------------------------------------------------------------- encoding


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoders:
    """T5 (sharded on the mesh) and CLIP of a FLUX.1 folder, encoding prompts on the mesh."""

    pipe: flux_pipeline.FluxPipeline  # components t5 and clip only
    mesh: Mesh
    max_sequence_length: int

    def __post_init__(self):
        t5, clip = self.pipe.t5, self.pipe.clip

        @jax.jit
        def encode(params, frozen, batch):
            del frozen
            return (flux_pipeline.encode_t5(t5, params["t5"], batch["t5"]).astype(jnp.bfloat16),
                    flux_pipeline.encode_clip(clip, params["clip"], batch["clip"]
                                              ).astype(jnp.float32))

        object.__setattr__(self, "_encode", encode)

    @property
    def widths(self) -> tuple[int, int]:
        return self.pipe.t5.d_model, self.pipe.clip.hidden_size

    def __call__(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """{"txt": (B, S, D) bf16, "y": (B, P) float32} for every process (same prompts on
        each): the rows are split over the mesh's data axes and gathered."""
        t5_ids, clip_ids = self.pipe.tokenize(list(prompts), self.max_sequence_length)
        n = len(prompts)
        pad = -n % parallel.data_parallel_size(self.mesh)
        ids = {"t5": np.pad(t5_ids, ((0, pad), (0, 0))),
               "clip": np.pad(clip_ids, ((0, pad), (0, 0)))}
        txt, y = sampling.on_mesh(self._encode, self.mesh, self.pipe.params, {}, ids)
        return {"txt": np.asarray(txt)[:n].astype(TXT_DTYPE),
                "y": np.asarray(y)[:n].astype(Y_DTYPE)}


def load_text_encoders(folder: str, mesh: Mesh, rules: Sequence[tuple[str, Any]] = parallel.
                       DEFAULT_RULES, *, max_sequence_length: int = 512,
                       dtype: str = "bfloat16", param_dtype: Any = "bfloat16") -> TextEncoders:
    """T5 streamed onto its shards of `mesh`, CLIP whole, tokenizers; compute in `dtype`."""
    pipe = flux_pipeline.load_flux_pipeline(folder, dtype, components=("t5", "clip"),
                                            param_dtype=param_dtype, mesh=mesh, rules=rules)
    return TextEncoders(pipe, mesh, int(max_sequence_length))


def embed_prompts(folder: str, prompts: Sequence[str], keys: Sequence[str], out_dir: str,
                  mesh: Mesh, rules: Sequence[tuple[str, Any]] = parallel.DEFAULT_RULES, *,
                  max_sequence_length: int = 512, shard_size: int = 128, batch_size: int = 16,
                  dtype: str = "bfloat16",
                  on_shard: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Encodes the prompts not yet in `out_dir` into new shards; returns counts.

    Args:
      folder: the FLUX.1 folder (text_encoder/, text_encoder_2/, tokenizers).
      prompts, keys: the prompt texts and their `data.prompt_key`s (repeats skipped).
      out_dir: the embeddings folder (created; an existing one is resumed).
      shard_size: prompts per shard file; batch_size: prompts per encoder call.
      dtype: compute dtype of the encoders (their params are bf16).
      on_shard: called as `on_shard(shard_number, prompts_done)` after each shard.

    Raises:
      StaleEmbeddings: `out_dir` holds embeddings of other encoders or another length.
    """
    index_file = os.path.join(out_dir, INDEX)
    writer = jax.process_index() == 0
    if os.path.isfile(index_file):
        index = _read_index(index_file)
        check_fingerprint(index_file, index, folder, max_sequence_length)
    else:
        index = {"version": VERSION,
                 "fingerprint": encoder_fingerprint(folder, max_sequence_length),
                 "max_sequence_length": int(max_sequence_length), "shards": []}
    done = {k for shard in index["shards"] for k in shard["keys"]}
    todo = {}
    for text, key in zip(prompts, keys):
        if key not in done and key not in todo:
            todo[key] = text
    counts = {"prompts": len(set(keys)), "skipped": len(set(keys)) - len(todo),
              "encoded": 0, "shards": 0}
    if not todo:
        return counts
    encoders = load_text_encoders(folder, mesh, rules, max_sequence_length=max_sequence_length,
                                  dtype=dtype)
    index["widths"] = list(encoders.widths)
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    items = list(todo.items())
    bar = tqdm(total=len(items), desc="embed", disable=not writer, dynamic_ncols=True)
    try:
        for start in range(0, len(items), shard_size):
            chunk = items[start:start + shard_size]
            parts = [encoders([text for _, text in chunk[i:i + batch_size]])
                     for i in range(0, len(chunk), batch_size)]
            for part in parts:
                bar.update(len(part["y"]))
            number = len(index["shards"])
            name = f"shard-{number:05d}.safetensors"
            if writer:
                save_file({"t5": np.concatenate([p["txt"] for p in parts]),
                           "clip": np.concatenate([p["y"] for p in parts])},
                          os.path.join(out_dir, name), metadata={"format": "np"})
                index["shards"].append({"file": name, "keys": [k for k, _ in chunk]})
                _write_index(index_file, index)
            else:
                index["shards"].append({"file": name, "keys": [k for k, _ in chunk]})
            counts["encoded"] += len(chunk)
            counts["shards"] += 1
            if on_shard is not None:
                on_shard(number, counts["encoded"])
    finally:
        bar.close()
    return counts


# ----------------------------------------------------------------------------- reading


class EmbeddingStore:
    """Rows of an embeddings folder by prompt key, read by memory-mapping the shards."""

    def __init__(self, index_file: str, index: dict[str, Any]):
        self.index_file = index_file
        self.root = os.path.dirname(index_file)
        self.max_sequence_length = int(index["max_sequence_length"])
        self.fingerprint = index["fingerprint"]  # the encoders the rows were computed with
        self.widths = tuple(index.get("widths") or ())
        self.where = {key: (shard["file"], row) for shard in index["shards"]
                      for row, key in enumerate(shard["keys"])}

    def __len__(self) -> int:
        return len(self.where)

    def missing(self, keys: Sequence[str]) -> list[str]:
        return [k for k in keys if k not in self.where]

    def __call__(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """{"txt": (B, S, D) bf16, "y": (B, P) float32} for these prompt keys."""
        rows: dict[str, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            if key not in self.where:
                raise ValueError(f"{self.index_file}: prompt {key} is not embedded; run "
                               "--config.task=embed again (it resumes) with this prompt file")
            file, row = self.where[key]
            rows.setdefault(file, []).append((i, row))
        txt = y = None
        for file, pairs in rows.items():
            with safe_open(os.path.join(self.root, file), framework="numpy") as f:
                t5, clip = f.get_slice("t5"), f.get_slice("clip")
                if txt is None:
                    shape = t5.get_shape()
                    txt = np.empty((len(keys),) + tuple(shape[1:]), TXT_DTYPE)
                    y = np.empty((len(keys), clip.get_shape()[1]), Y_DTYPE)
                for i, row in pairs:
                    txt[i] = t5[row:row + 1][0]
                    y[i] = clip[row:row + 1][0]
        return {"txt": txt, "y": y}


def open_embeddings(path: str, folder: str, max_sequence_length: int,
                    widths: tuple[int, int] | None = None) -> EmbeddingStore:
    """The embeddings under `path` (DIR or DIR/embeddings), checked against the encoders
    of `folder` and `max_sequence_length` (StaleEmbeddings otherwise) and, when given,
    the transformer's input widths (context_in_dim, vec_in_dim)."""
    file = find_index(path)
    index = _read_index(file)
    check_fingerprint(file, index, folder, max_sequence_length)
    store = EmbeddingStore(file, index)
    if widths is not None and store.widths and tuple(store.widths) != tuple(widths):
        raise StaleEmbeddings(f"{file}: embeddings of widths {tuple(store.widths)} do not fit "
                              f"the transformer's inputs {tuple(widths)}; recompute them with "
                              "--config.task=embed for this FLUX.1 folder")
    return store
