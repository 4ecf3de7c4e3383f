"""Prompt sets: local prompt files, train/test splits, and a per-host order fixed by (seed, step).

Readers (`read_prompts`, format detected from the file or given):
  * text: one prompt per line; blank lines and lines starting with `#` are skipped. This is
    also the Flow-GRPO / Pick-a-Pic layout (`train.txt`, `test.txt`);
  * jsonl: one JSON object per line with a "prompt" field (Flow-GRPO / GenEval metadata);
  * json: the HPDv2 prompt files, a JSON list of strings or of objects with a "prompt" field.
Bad input raises FileNotFoundError / ValueError with one line naming the file (and line), and
the fix.

Splits (`load_split`): a folder holding `train.*` and `test.*` gives both splits; a single
file with `test_path` is an explicit split; a single file alone is split by a hash of each
prompt's text (`test_fraction` of it to test), so a prompt keeps its split when others are
added. Repeated prompts are kept once (first occurrence). A prompt's position in its split is
its id: appending lines never moves an earlier prompt. `PromptSet.keys` (a hash of the text)
names a prompt stably under any edit, for records and evaluation outputs.

Order (`PromptStream`): the global batch at `step` is a pure function of (seed, step): epoch e
is the permutation `np.random.default_rng([seed, e]).permutation(n)`, and the epochs are
walked in order, `batch_size` prompts per step. Every prompt is seen once per epoch, and a run
resumed at step s sees exactly the prompts the uninterrupted run saw. Each process takes only
the rows of that global batch its devices hold (`process_rows`), and `global_batch` assembles
the per-process arrays into global jax Arrays with `jax.make_array_from_process_local_data`.

Why not tensorflow-datasets here: a tfds pipeline shuffles a stream through a buffer, so its
position is iterator state, not a function of the step; `tfds.split_for_jax_process` gives
each host a fixed 1/P of the *dataset*, so the global batch would change with the number of
hosts and each host would only ever see its own subset. Splitting the *global batch* by index
(what this module does) keeps the batch independent of the topology, and each host still reads
only its slice. Prompt sets are a few MB of text, so a TFRecord build step and the TensorFlow
import (seconds) would add weight and nothing else; this module imports only numpy, jax and
etils.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, Sharding

from leapalign_jax.parallel import batch_sharding

FORMATS = ("text", "jsonl", "json")
SPLITS = ("train", "test")
_SUFFIX_FORMAT = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "json"}
_FIX_FORMAT = ("use a .txt file (one prompt per line), a .jsonl file with a \"prompt\" field "
               "per line, or a .json list of strings / of objects with a \"prompt\" field")


# ----------------------------------------------------------------------------- readers


def _decode(path: epath.Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                         "re-save the file as UTF-8") from None


def _detect(path: epath.Path, text: str) -> str:
    fmt = _SUFFIX_FORMAT.get(path.suffix.lower())
    if fmt:
        return fmt
    head = text.lstrip()[:1]
    return "json" if head == "[" else "jsonl" if head == "{" else "text"


def _prompt_of(path: epath.Path, where: str, item: Any) -> str:
    """The prompt of one JSON item: a string, or an object's "prompt" string."""
    if isinstance(item, dict):
        if "prompt" not in item:
            raise ValueError(f"{path}: {where} has no \"prompt\" field (keys: "
                             f"{sorted(item)[:5]}); give every object a \"prompt\" string")
        item = item["prompt"]
    if not isinstance(item, str):
        raise ValueError(f"{path}: {where} is a {type(item).__name__}, not a prompt string; "
                         + _FIX_FORMAT)
    return item


def _parse(path: epath.Path, text: str, fmt: str) -> list[str]:
    if fmt == "text":
        lines = (line.strip() for line in text.splitlines())
        return [line for line in lines if line and not line.startswith("#")]
    if fmt == "jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: invalid JSON ({e.msg}); write one JSON "
                                 "object with a \"prompt\" field per line") from None
            if not isinstance(item, dict):
                raise ValueError(f"{path}:{number}: a JSON {type(item).__name__}, not an "
                                 "object; write one object with a \"prompt\" field per line")
            prompts.append(_prompt_of(path, f"line {number}", item).strip())
        return [p for p in prompts if p]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); " + _FIX_FORMAT) from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a JSON {type(data).__name__}, not a list; " + _FIX_FORMAT)
    prompts = [_prompt_of(path, f"item {i}", item).strip() for i, item in enumerate(data)]
    return [p for p in prompts if p]


def read_prompts(path: str | epath.PathLike, format: str = "auto") -> list[str]:
    """The prompts of one file in file order (repeats kept), stripped of surrounding space.

    `format` is "auto" (by suffix, else by the first character: `[` json, `{` jsonl, else
    text) or one of FORMATS.
    """
    path = epath.Path(path)
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"{path}: unknown prompt format {format!r}; use one of "
                         f"{('auto',) + FORMATS}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: prompt file not found; check the path (a .txt, "
                                ".jsonl or .json file, or a folder with train.txt and "
                                "test.txt)")
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not a prompt file; pass it to load_split "
                         "(it needs train.txt and test.txt) or name one file")
    text = _decode(path, path.read_bytes())
    prompts = _parse(path, text, _detect(path, text) if format == "auto" else format)
    if not prompts:
        raise ValueError(f"{path}: no prompts (empty, or only blank lines and # comments); "
                         "add at least one prompt")
    return prompts


# ----------------------------------------------------------------------------- splits


def prompt_key(text: str) -> str:
    """A prompt's stable name: 16 hex digits of the SHA-256 of its text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _test_hash(text: str) -> float:
    """A uniform number in [0, 1) fixed by the text alone, for the hash split."""
    digest = hashlib.sha256(b"leapalign-split\0" + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """The distinct prompts of one split; a prompt's id is its position in `texts`."""

    texts: tuple[str, ...]
    source: str  # file and split, for messages and run records

    def __len__(self) -> int:
        return len(self.texts)

    @functools.cached_property
    def keys(self) -> tuple[str, ...]:
        """`prompt_key` of every prompt: stable under any edit of the file."""
        return tuple(prompt_key(t) for t in self.texts)

    def lookup(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """The prompts with these ids (positions), e.g. a process's `PromptStream.local`."""
        return [self.texts[int(i)] for i in np.asarray(ids).reshape(-1)]


def _dedupe(prompts: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(prompts))


def _split_file(folder: epath.Path, split: str) -> epath.Path:
    for suffix in (".txt", ".jsonl", ".json"):
        if (folder / (split + suffix)).exists():
            return folder / (split + suffix)
    raise FileNotFoundError(f"{folder}: no {split}.txt/.jsonl/.json in this prompt folder; "
                            "put train.txt and test.txt in it (Flow-GRPO layout) or pass "
                            "one file")


def load_split(path: str | epath.PathLike, split: str = "train", *,
               test_path: str | epath.PathLike | None = None, test_fraction: float = 0.0,
               format: str = "auto") -> PromptSet:
    """One split of a prompt set.

    `path` is a folder with train.* and test.* (Flow-GRPO / Pick-a-Pic), or a file: with
    `test_path` the two files are the splits; alone, each prompt goes to "test" when the hash
    of its text falls below `test_fraction`, so the split of a prompt never depends on the
    other lines.
    """
    path = epath.Path(path)
    if split not in SPLITS:
        raise ValueError(f"{path}: unknown split {split!r}; use one of {SPLITS}")
    if (path.is_dir() or test_path is not None) and test_fraction:
        raise ValueError(f"{path}: test_fraction splits a single file, but the test split is "
                         "given; drop test_fraction or test_path")
    if path.is_dir():
        if test_path is not None:
            raise ValueError(f"{path}: a folder already holds both splits; drop test_path "
                             f"({test_path})")
        file = _split_file(path, split)
        return PromptSet(_dedupe(read_prompts(file, format)), f"{file}")
    if test_path is not None:
        file = path if split == "train" else epath.Path(test_path)
        return PromptSet(_dedupe(read_prompts(file, format)), f"{file}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"{path}: test_fraction {test_fraction} is outside [0, 1); give the "
                         "share of prompts held out for testing, e.g. 0.1")
    prompts = _dedupe(read_prompts(path, format))
    chosen = tuple(p for p in prompts if (_test_hash(p) < test_fraction) == (split == "test"))
    if not chosen:
        raise ValueError(f"{path}: the {split} split (test_fraction={test_fraction}) has no "
                         "prompts; " + ("raise test_fraction or give test_path"
                                        if split == "test" else "lower test_fraction"))
    return PromptSet(chosen, f"{path}[{split}]")


# ----------------------------------------------------------------------------- order


def process_rows(batch_size: int, sharding: Sharding | None = None,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> np.ndarray:
    """The rows of a global batch that one process holds, in the order of the global batch.

    With a `sharding` (batch dimension first) these are the rows its devices address, which
    is what `jax.make_array_from_process_local_data` expects as that process's data; they
    need not be contiguous (e.g. a batch split fsdp-major over a mesh whose data axis runs
    across hosts). Without one, the batch is cut into `process_count` equal contiguous parts.
    """
    pi = jax.process_index() if process_index is None else int(process_index)
    if sharding is not None:
        rows: set[int] = set()
        for device, index in sharding.devices_indices_map((batch_size,)).items():
            if device.process_index == pi:
                rows.update(range(batch_size)[index[0]])
        if not rows:
            raise ValueError(f"process {pi} holds no device of the sharding {sharding}; "
                             "build the mesh over jax.devices()")
        return np.asarray(sorted(rows), np.int64)
    count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < count:
        raise ValueError(f"process_index {pi} is outside [0, {count})")
    if batch_size % count:
        raise ValueError(f"global batch size {batch_size} does not divide over {count} "
                         f"processes; use a multiple of {count}")
    share = batch_size // count
    return np.arange(pi * share, (pi + 1) * share)


class PromptStream:
    """Prompt ids of every step: global batches fixed by (seed, step), a slice per process.

    Epoch e is `default_rng([seed, e]).permutation(n)`; step s takes positions
    [s * batch_size, (s + 1) * batch_size) of the epochs laid end to end. Nothing depends on
    past calls, so a stream built fresh at step s (a resumed run) matches one that walked
    there, and it does not depend on the number of processes either.
    """

    def __init__(self, prompts: PromptSet | int, batch_size: int, seed: int, *,
                 process_index: int | None = None, process_count: int | None = None,
                 sharding: Sharding | None = None):
        self.size = prompts if isinstance(prompts, int) else len(prompts)
        if self.size < 1 or batch_size < 1:
            raise ValueError(f"a prompt stream needs prompts and a batch: got {self.size} "
                             f"prompts, batch size {batch_size}")
        if seed < 0:
            raise ValueError(f"seed {seed} must be non-negative")
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rows = process_rows(self.batch_size, sharding, process_index, process_count)
        self._epochs: dict[int, np.ndarray] = {}

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of all prompt ids that epoch `epoch` walks."""
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # a step spans at most a few consecutive epochs
                self._epochs.pop(min(self._epochs))
            rng = np.random.default_rng([self.seed, epoch])
            self._epochs[epoch] = rng.permutation(self.size).astype(np.int32)
        return self._epochs[epoch]

    def global_ids(self, step: int) -> np.ndarray:
        """The ids (positions in the PromptSet) of the whole global batch at `step`, int32."""
        if step < 0:
            raise ValueError(f"step {step} must be non-negative")
        start, stop = step * self.batch_size, (step + 1) * self.batch_size
        parts = []
        for epoch in range(start // self.size, (stop - 1) // self.size + 1):
            lo, hi = max(start, epoch * self.size), min(stop, (epoch + 1) * self.size)
            parts.append(self.epoch_order(epoch)[lo - epoch * self.size:hi - epoch * self.size])
        return np.concatenate(parts)

    def local(self, step: int) -> np.ndarray:
        """This process's rows of `global_ids(step)`: the ids whose prompts it reads."""
        return self.global_ids(step)[self.rows]

    def epoch_of(self, step: int) -> float:
        """Epochs completed at the start of `step` (for logs)."""
        return step * self.batch_size / self.size


# ----------------------------------------------------------------------------- placement


def global_batch(local_tree: Any, mesh: Mesh, sharding: Sharding | None = None) -> Any:
    """Global jax Arrays from each process's rows (`PromptStream.local` order), batch first.

    Call it on every process with that process's numpy arrays; `sharding` defaults to the
    batch split of `parallel.batch_sharding`. Leaves without a batch dimension (scalars) are
    replicated and must be equal on every process.
    """
    sharding = batch_sharding(mesh) if sharding is None else sharding
    replicated = NamedSharding(mesh, P())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(
            sharding if x.ndim else replicated, x, None if x.ndim else x.shape)

    return jax.tree.map(put, local_tree)
