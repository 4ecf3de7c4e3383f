"""A FLUX.1 pipeline folder in diffusers layout: checks, tokenizers, scheduler, writers.

The folder `FluxPipeline.save_pretrained` writes (and black-forest-labs/FLUX.1-dev ships):

    model_index.json                 pipeline class and one [library, class] per component
    transformer/                     FluxTransformer2DModel     (weights/flux.py)
    text_encoder/                    CLIPTextModel, CLIP-L      (weights/clip.py)
    text_encoder_2/                  T5EncoderModel, sharded    (weights/t5.py)
    vae/                             AutoencoderKL              (weights/autoencoder.py)
    tokenizer/                       CLIPTokenizer: vocab.json + merges.txt
    tokenizer_2/                     T5TokenizerFast: tokenizer.json (or spiece.model)
    scheduler/scheduler_config.json  FlowMatchEulerDiscreteScheduler

Reading: `check_model_index` refuses folders of other model families, `component_dir` a
missing component, `load_tokenizers` reads both tokenizers through transformers from local
files only, `read_scheduler_config` the schedule's shift parameters, and
`load_component` turns a loader's list of bad tensors into an error whose first line names
the file, the first bad key and the fix.

Writing (no torch): `write_tiny_flux_folder(path, seed)` writes a complete tiny random
FLUX.1 folder from our own Flax inits, readable both by `load_flux_pipeline` and by
diffusers' `FluxPipeline.from_pretrained`; the per-component savers it uses
(`save_t5_folder`, `save_clip_text_folder`, `save_vae_folder`, the tokenizer writers) are
the inverses of the loaders' key tables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, TypeVar

import flax
import flax.linen as nn
import numpy as np
from safetensors.numpy import save_file

from leapalign_jax.models import autoencoder as vae_model
from leapalign_jax.models import clip as clip_model
from leapalign_jax.models import flux as flux_model
from leapalign_jax.models import t5 as t5_model
from leapalign_jax.weights.autoencoder import flax_to_diffusers
from leapalign_jax.weights.clip import HF_TEXT_KEYS, plan_from_table
from leapalign_jax.weights.files import Tensors, float_dtype, read_json
from leapalign_jax.weights.flux import save_flux_diffusers
from leapalign_jax.weights.t5 import torch_keys as t5_torch_keys

Params = dict[str, Any]
T = TypeVar("T")

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")
_DOWNLOAD = ("download the complete folder, e.g. `huggingface-cli download "
             "black-forest-labs/FLUX.1-dev --local-dir DIR`")


@dataclasses.dataclass(frozen=True)
class Component:
    """One entry of a FLUX.1 model_index.json."""

    key: str  # subfolder and model_index.json key
    classes: tuple[str, ...]  # accepted class names
    what: str  # for messages


COMPONENTS: dict[str, Component] = {c.key: c for c in (
    Component("transformer", ("FluxTransformer2DModel",), "Flux transformer"),
    Component("text_encoder", ("CLIPTextModel",), "CLIP-L text encoder"),
    Component("text_encoder_2", ("T5EncoderModel",), "T5 text encoder"),
    Component("vae", ("AutoencoderKL",), "VAE"),
    Component("tokenizer", ("CLIPTokenizer", "CLIPTokenizerFast"), "CLIP tokenizer"),
    Component("tokenizer_2", ("T5TokenizerFast", "T5Tokenizer"), "T5 tokenizer"),
    Component("scheduler", ("FlowMatchEulerDiscreteScheduler",), "scheduler"),
)}


# ----------------------------------------------------------------------------- checks


def check_model_index(folder: str, needed: tuple[str, ...] = tuple(COMPONENTS)) -> dict:
    """Reads `folder/model_index.json` and checks it describes a FLUX.1 pipeline.

    Raises:
      FileNotFoundError: no folder or no model_index.json.
      ValueError: another pipeline family (e.g. Stable Diffusion), or a `needed` component
        that is absent or of another class.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"FLUX.1 pipeline folder not found: {folder}; pass a diffusers "
                                "FLUX.1 folder (model_index.json, transformer/, vae/, ...)")
    file = os.path.join(folder, MODEL_INDEX)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found; pass the pipeline folder that holds "
                                f"model_index.json (diffusers layout), or {_DOWNLOAD}")
    index = read_json(file)
    name = str(index.get("_class_name", ""))
    if not name.startswith("Flux"):
        raise ValueError(f"{file}: _class_name is {name!r}, not a FLUX.1 pipeline "
                         "(FluxPipeline); pass a FLUX.1 folder (e.g. FLUX.1-dev or "
                         "FLUX.1-schnell in diffusers layout)")
    for key in needed:
        component = COMPONENTS[key]
        entry = index.get(key)
        found = entry[1] if isinstance(entry, list) and len(entry) == 2 else entry
        if found is None:
            raise ValueError(f"{file}: no {key!r} entry (the {component.what}); this folder "
                             f"is not a complete FLUX.1 pipeline, {_DOWNLOAD}")
        if found not in component.classes:
            raise ValueError(f"{file}: {key} is {found!r}, not {component.classes[0]}; this is "
                             "another model family, pass a FLUX.1 folder")
    return index


def component_dir(folder: str, key: str) -> str:
    """`folder/key`, which must hold the component's config (FileNotFoundError otherwise)."""
    component = COMPONENTS[key]
    where = os.path.join(folder, key)
    probe = {"scheduler": "scheduler_config.json",
             "tokenizer": None, "tokenizer_2": None}.get(key, "config.json")
    missing = (not os.path.isdir(where) if probe is None
               else not os.path.isfile(os.path.join(where, probe)))
    if missing:
        shown = where if probe is None else os.path.join(where, probe)
        raise FileNotFoundError(f"{shown} not found: the FLUX.1 folder lacks its "
                                f"{component.what} ({key}/); {_DOWNLOAD}")
    return where


_CHECK_SHAPES_HEAD = re.compile(r"^(?P<source>.*?): (?P<n>\d+) tensor\(s\) do not fit "
                                r"(?P<what>.*?); (?P<hint>.*):$")
_PROBLEM = re.compile(r"^  (?P<kind>missing|wrong shape|unexpected) (?P<key>[^:]+): "
                      r"(?P<detail>.*)$")


def _file_of(key: str, files: list[str], kind: str) -> str:
    """The weight file holding `key`; for a missing key the index (or single) file."""
    if kind != "missing":
        with contextlib.ExitStack() as stack:
            for file in files:
                if key in Tensors([file], stack):
                    return file
    if len(files) > 1:
        indexes = [f for f in os.listdir(os.path.dirname(files[0])) if f.endswith(".index.json")]
        if indexes:
            return os.path.join(os.path.dirname(files[0]), indexes[0])
    return files[0]


def load_component(key: str, load: Callable[[], T], weight_files: Callable[[], list[str]]
                   ) -> T:
    """Runs a component loader; a list of bad tensors becomes an error whose first line
    names the weight file, the first bad key and the fix (the full list follows).

    `weight_files` lists the component's safetensors files (called only on error).
    """
    try:
        return load()
    except ValueError as err:
        lines = str(err).split("\n")
        head = _CHECK_SHAPES_HEAD.match(lines[0])
        problem = _PROBLEM.match(lines[1]) if head and len(lines) > 1 else None
        if problem is None:
            raise
        file = _file_of(problem["key"], weight_files(), problem["kind"])
        n = int(head["n"])
        more = f" (and {n - 1} more, listed below)" if n > 1 else ""
        raise ValueError(
            f"{file}: {problem['kind']} tensor {problem['key']} ({problem['detail']}){more} "
            f"in the {COMPONENTS[key].what} ({key}/); {head['hint']}\n" + str(err)) from err


# ----------------------------------------------------------------------------- tokenizers


def load_tokenizers(folder: str, clip: bool = True, t5: bool = True) -> tuple[Any, Any]:
    """(CLIP tokenizer or None, T5 tokenizer or None) of a FLUX.1 folder, through
    transformers (`CLIPTokenizer`, `T5TokenizerFast`) from local files only.

    Raises:
      FileNotFoundError: a tokenizer folder or its vocabulary files are missing.
      ValueError: transformers cannot build a tokenizer from the files.
    """
    import transformers  # a runtime dependency, imported when a folder is loaded

    def load(key: str, cls: Any, options: list[tuple[str, ...]]) -> Any:
        where = component_dir(folder, key)
        if not any(all(os.path.isfile(os.path.join(where, f)) for f in files)
                   for files in options):
            wanted = " or ".join(" + ".join(files) for files in options)
            raise FileNotFoundError(f"{where}: no {wanted}; the {COMPONENTS[key].what} is "
                                    f"incomplete, {_DOWNLOAD}")
        try:
            return cls.from_pretrained(where, local_files_only=True)
        except (OSError, ValueError, ImportError, TypeError) as err:
            raise ValueError(f"{where}: transformers' {cls.__name__} cannot read these files "
                             f"({err}); re-download the folder (a tokenizer_2/ with only "
                             "spiece.model also needs the sentencepiece package)") from err

    clip_tok = (load("tokenizer", transformers.CLIPTokenizer,
                     [("vocab.json", "merges.txt"), ("tokenizer.json",)]) if clip else None)
    t5_tok = (load("tokenizer_2", transformers.T5TokenizerFast,
                   [("tokenizer.json",), ("spiece.model",)]) if t5 else None)
    return clip_tok, t5_tok


# ----------------------------------------------------------------------------- scheduler


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The parts of `scheduler/scheduler_config.json` that fix FluxPipeline's schedule
    (field names and defaults as in diffusers' FlowMatchEulerDiscreteScheduler)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None

    def mu(self, image_seq_len: int) -> float:
        """FluxPipeline's `calculate_shift`: linear in the packed image token count."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len
                                                  - self.base_image_seq_len)
        return image_seq_len * m + (self.base_shift - m * self.base_image_seq_len)

    def sigmas(self, num_steps: int, image_seq_len: int) -> np.ndarray:
        """FluxPipeline's schedule `sigma_0 > ... > sigma_T = 0` (T + 1,) float32.

        The same float32 arithmetic as `FlowMatchEulerDiscreteScheduler.set_timesteps(
        sigmas=linspace(1, 1/T, T), mu=mu(image_seq_len))`, then the appended 0.
        """
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1")
        num_steps = int(num_steps)
        if self.shift_terminal and num_steps < 2:
            raise ValueError("shift_terminal needs num_steps >= 2 (one step has nothing to "
                             "stretch); use more steps")
        s = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
        if self.use_dynamic_shifting:
            mu = self.mu(image_seq_len)
            if self.time_shift_type == "exponential":
                s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
            else:
                s = mu / (mu + (1 / s - 1))
        else:
            s = self.shift * s / (1 + (self.shift - 1) * s)
        if self.shift_terminal:
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        return np.concatenate([s.astype(np.float32), np.zeros(1, np.float32)])


# Scheduler options FLUX.1 never sets and this schedule does not implement.
_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "invert_sigmas", "stochastic_sampling", "use_flow_sigmas")


def read_scheduler_config(folder: str) -> SchedulerConfig:
    """The SchedulerConfig of a FLUX.1 folder (`scheduler/scheduler_config.json`)."""
    file = os.path.join(component_dir(folder, "scheduler"), "scheduler_config.json")
    cfg = read_json(file)
    name = cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if name != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"{file}: _class_name is {name!r}, not FlowMatchEulerDiscreteScheduler;"
                         " pass a FLUX.1 folder")
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise ValueError(f"{file}: {key} is set, which FLUX.1's schedule never uses and "
                             f"this pipeline does not implement; set {key} to false")
    fields = {f.name: cfg[f.name] for f in dataclasses.fields(SchedulerConfig)
              if cfg.get(f.name) is not None}
    config = SchedulerConfig(**fields)
    if config.time_shift_type not in ("exponential", "linear"):
        raise ValueError(f"{file}: time_shift_type {config.time_shift_type!r} is not "
                         "'exponential' or 'linear'; fix scheduler_config.json")
    if config.max_image_seq_len == config.base_image_seq_len:
        raise ValueError(f"{file}: max_image_seq_len equals base_image_seq_len; the shift "
                         "needs two different lengths")
    return config


# ----------------------------------------------------------------------------- writers


def _write_json(file: str, data: dict) -> None:
    os.makedirs(os.path.dirname(file), exist_ok=True)
    with open(file, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def _save_sharded(folder: str, tensors: dict[str, np.ndarray], single: str, index: str,
                  num_shards: int) -> None:
    """One safetensors file, or `num_shards` files plus a transformers-style index."""
    os.makedirs(folder, exist_ok=True)
    if num_shards <= 1:
        save_file(tensors, os.path.join(folder, single), metadata={"format": "pt"})
        return
    stem, ext = os.path.splitext(single)
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(keys)), num_shards)):
        name = f"{stem}-{i + 1:05d}-of-{num_shards:05d}{ext}"
        save_file({keys[j]: tensors[keys[j]] for j in part}, os.path.join(folder, name),
                  metadata={"format": "pt"})
        weight_map |= {keys[j]: name for j in part}
    total = sum(int(t.nbytes) for t in tensors.values())
    _write_json(os.path.join(folder, index),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _flat(params: Params) -> dict[tuple[str, ...], np.ndarray]:
    return {k: np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items()}


def _cast(array: np.ndarray, dtype: Any) -> np.ndarray:
    return np.ascontiguousarray(array if dtype is None else array.astype(float_dtype(dtype)))


def save_t5_folder(folder: str, config: t5_model.T5Config, params: Params, *,
                   num_shards: int = 1, dtype: Any = None) -> None:
    """Writes a transformers `T5EncoderModel` folder (config.json + safetensors, sharded with
    an index when `num_shards` > 1), the inverse of `load_t5`."""
    flat = _flat(params)
    tensors = {}
    for path, (key, transpose) in t5_torch_keys(config).items():
        tensors[key] = _cast(flat[path].T if transpose else flat[path], dtype)
    act = config.dense_act_fn
    proj = "gated-gelu" if config.is_gated_act and act == "gelu_new" else (
        ("gated-" if config.is_gated_act else "") + act)
    _save_sharded(folder, tensors, "model.safetensors", "model.safetensors.index.json",
                  num_shards)
    _write_json(os.path.join(folder, "config.json"), {
        "architectures": ["T5EncoderModel"], "model_type": "t5",
        "vocab_size": config.vocab_size, "d_model": config.d_model, "d_kv": config.d_kv,
        "d_ff": config.d_ff, "num_layers": config.num_layers, "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "layer_norm_epsilon": config.layer_norm_epsilon, "feed_forward_proj": proj,
        "dense_act_fn": act, "is_gated_act": config.is_gated_act, "dropout_rate": 0.0,
        "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0, "tie_word_embeddings": False, "dtype": "float32"})


def save_clip_text_folder(folder: str, config: clip_model.CLIPTextConfig, params: Params, *,
                          bos_token_id: int = 0, pad_token_id: int = 1,
                          dtype: Any = None) -> None:
    """Writes a transformers `CLIPTextModel` folder (keys under `text_model.`, as in
    FLUX.1's text_encoder/), the inverse of `load_clip_text` (no projection)."""
    if config.projection_dim is not None:
        raise ValueError("save_clip_text_folder writes a plain CLIPTextModel; pass a config "
                         "with projection_dim=None")
    flat = _flat(params)
    plan = plan_from_table(clip_model.abstract_params(config), HF_TEXT_KEYS, "text_model.")
    tensors = {p.key: _cast(flat[path].T if p.layout == "linear" else flat[path], dtype)
               for path, p in plan.items()}
    _save_sharded(folder, tensors, "model.safetensors", "model.safetensors.index.json", 1)
    _write_json(os.path.join(folder, "config.json"), {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": config.hidden_act, "layer_norm_eps": config.layer_norm_eps,
        "bos_token_id": bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": pad_token_id, "projection_dim": config.hidden_size,
        "attention_dropout": 0.0, "dropout": 0.0, "dtype": "float32"})


def save_vae_folder(folder: str, config: vae_model.AutoencoderConfig, params: Params, *,
                    dtype: Any = None) -> None:
    """Writes a diffusers `AutoencoderKL` folder, the inverse of `load_autoencoder`."""
    tensors = {}
    for path, leaf in _flat(params).items():
        array = leaf.transpose(3, 2, 0, 1) if leaf.ndim == 4 else leaf.T
        tensors[flax_to_diffusers(path)] = _cast(array, dtype)
    n = len(config.block_out_channels)
    _save_sharded(folder, tensors, "diffusion_pytorch_model.safetensors",
                  "diffusion_pytorch_model.safetensors.index.json", 1)
    _write_json(os.path.join(folder, "config.json"), {
        "_class_name": "AutoencoderKL", "act_fn": "silu",
        "in_channels": config.in_channels, "out_channels": config.out_channels,
        "latent_channels": config.latent_channels,
        "block_out_channels": list(config.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": config.layers_per_block, "norm_num_groups": config.norm_num_groups,
        "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_post_quant_conv,
        "mid_block_add_attention": config.mid_block_add_attention,
        "scaling_factor": config.scaling_factor, "shift_factor": config.shift_factor,
        "sample_size": 1024, "force_upcast": True})


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: the 256 characters standing for the 256 bytes."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = dict(zip(printable, printable)), 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return [chr(chars[b]) for b in sorted(chars)]


TINY_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "green", "the", "on", "in",
              "and", "with", "circle", "square", "small", "large")


def write_clip_tokenizer(folder: str, words: tuple[str, ...] = TINY_WORDS,
                         model_max_length: int = 77) -> int:
    """Writes a tiny CLIP byte-level BPE tokenizer (vocab.json, merges.txt, configs) in the
    real layout: the 256 byte characters, the same with `</w>`, merges spelling `words`,
    then `<|startoftext|>` and `<|endoftext|>` (the largest id, as in CLIP). Any text
    tokenizes; returns the vocabulary size."""
    alphabet = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab |= {c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)}
    merges = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if merged not in vocab:
                merges.append(f"{parts[0]} {parts[1]}")
                vocab[merged] = len(vocab)
            parts = [merged] + parts[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "vocab.json"), vocab)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    _write_json(os.path.join(folder, "special_tokens_map.json"), specials)
    _write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
        "do_lower_case": True, **specials})
    return len(vocab)


def write_t5_tokenizer(folder: str, words: tuple[str, ...] = TINY_WORDS,
                       model_max_length: int = 512) -> int:
    """Writes a tiny T5 tokenizer.json (a Unigram model built with the `tokenizers` library)
    with T5's special ids pad=0, eos=1, unk=2, the pieces `▁word`, and every lowercase
    letter and digit with and without `▁`, so any text tokenizes (unknown characters to
    unk). Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    letters = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    candidates = ([("\u2581" + w, -3.0) for w in words] + [(c, -5.0) for c in letters]
                  + [("\u2581" + c, -5.5) for c in letters])
    for piece, score in candidates:
        if piece not in seen:
            pieces.append((piece, score))
            seen.add(piece)
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    _write_json(os.path.join(folder, "special_tokens_map.json"), specials)
    _write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "T5Tokenizer", "model_max_length": model_max_length,
        "extra_ids": 0, **specials})
    return len(pieces)


FLUX_DEV_SCHEDULER = SchedulerConfig(shift=3.0, use_dynamic_shifting=True)


def write_scheduler_config(folder: str, config: SchedulerConfig = FLUX_DEV_SCHEDULER) -> None:
    """Writes `folder/scheduler/scheduler_config.json` (FLUX.1-dev's by default)."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
    _write_json(os.path.join(folder, SCHEDULER_CONFIG),
                {"_class_name": "FlowMatchEulerDiscreteScheduler", **fields})


def write_model_index(folder: str) -> None:
    """Writes FLUX.1's `model_index.json` (FluxPipeline and its seven components)."""
    libraries = {"transformer": "diffusers", "vae": "diffusers", "scheduler": "diffusers"}
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0"}
    index |= {key: [libraries.get(key, "transformers"), c.classes[0]]
              for key, c in COMPONENTS.items()}
    index |= {"image_encoder": [None, None], "feature_extractor": [None, None]}
    _write_json(os.path.join(folder, MODEL_INDEX), index)


@dataclasses.dataclass(frozen=True)
class TinyFluxConfigs:
    """The configs of a tiny FLUX.1 folder; they must agree with one another (see
    `write_tiny_flux_folder`)."""

    transformer: flux_model.FluxConfig
    t5: t5_model.T5Config
    clip: clip_model.CLIPTextConfig
    vae: vae_model.AutoencoderConfig
    scheduler: SchedulerConfig = FLUX_DEV_SCHEDULER


def tiny_flux_configs(t5_vocab: int = 128, clip_vocab: int = 560) -> TinyFluxConfigs:
    """Matching tiny configs: T5 d_model 32 = the transformer's context width, CLIP hidden
    16 = its pooled width, 4 latent channels x 2x2 packing = its 16 input channels, a
    2x-down VAE. Vocabularies must cover the tokenizers (`write_*_tokenizer` sizes)."""
    return TinyFluxConfigs(
        transformer=flux_model.tiny_config(mlp_ratio=4.0),
        t5=t5_model.tiny_t5_config(vocab_size=t5_vocab),
        clip=clip_model.CLIPTextConfig(vocab_size=clip_vocab, hidden_size=16,
                                       intermediate_size=32, num_layers=1, num_heads=2),
        vae=vae_model.tiny_autoencoder_config())


def random_params(abstract: Any, seed: int, *, in_dims: Callable[[tuple[str, ...]], int]
                  = lambda path: 0) -> Params:
    """Random numpy params of the shapes of `abstract` (an `abstract_params` tree), every
    leaf random: kernels N(0, 1 / fan_in) (lecun normal), norm weights 1 + N(0, 0.05^2),
    biases and other leaves N(0, 0.05^2), embeddings N(0, 0.5^2). Built with numpy only (no
    compilation), deterministic in `seed`.

    `in_dims(path)` gives how many leading kernel dims form the input (0: all but the last,
    as for Dense and Conv kernels; Flux's multi-dim kernels need `kernel_in_dims`).
    """
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract))
    out = {}
    for path, leaf in sorted(flat.items()):
        shape, name = tuple(leaf.shape), path[-1]
        noise = rng.standard_normal(shape).astype(np.float32)
        if name == "kernel":
            n = in_dims(path) or len(shape) - 1
            out[path] = noise / np.sqrt(math.prod(shape[:n]))
        elif name in ("scale", "weight"):
            out[path] = 1.0 + 0.05 * noise
        elif name == "embedding":
            out[path] = 0.5 * noise
        else:
            out[path] = 0.05 * noise
    return flax.traverse_util.unflatten_dict(out)


def write_tiny_flux_folder(path: str | os.PathLike, seed: int = 0,
                           configs: TinyFluxConfigs | None = None) -> TinyFluxConfigs:
    """Writes a complete tiny random FLUX.1 folder (diffusers layout) without torch.

    Weights are `random_params` of our Flax models' shapes (every leaf random, norm weights
    and biases included; numpy only, so writing takes no compilation), deterministic in
    `seed`; T5 is saved in two shards with an index, as FLUX.1-dev's is.
    The folder loads with `load_flux_pipeline` and with diffusers'
    `FluxPipeline.from_pretrained`. Returns the configs written.
    """
    folder = os.fspath(path)
    configs = configs or tiny_flux_configs()
    c = configs
    if c.transformer.context_in_dim != c.t5.d_model or c.transformer.vec_in_dim != \
            c.clip.hidden_size or c.transformer.in_channels != 4 * c.vae.latent_channels:
        raise ValueError("write_tiny_flux_folder: the configs disagree; the transformer needs "
                         "context_in_dim = T5 d_model, vec_in_dim = CLIP hidden_size and "
                         "in_channels = 4 x VAE latent_channels")
    os.makedirs(folder, exist_ok=True)
    t5_vocab = write_t5_tokenizer(os.path.join(folder, "tokenizer_2"))
    clip_vocab = write_clip_tokenizer(os.path.join(folder, "tokenizer"),
                                      model_max_length=c.clip.max_position_embeddings)
    if t5_vocab > c.t5.vocab_size or clip_vocab > c.clip.vocab_size:
        raise ValueError(f"write_tiny_flux_folder: the tokenizers have {t5_vocab} (T5) and "
                         f"{clip_vocab} (CLIP) tokens, more than the encoders' vocab_size "
                         f"{c.t5.vocab_size} / {c.clip.vocab_size}; raise vocab_size")
    seeds = np.random.SeedSequence(seed).generate_state(4)
    save_flux_diffusers(os.path.join(folder, "transformer"), c.transformer, random_params(
        flux_model.abstract_params(c.transformer), seeds[0], in_dims=flux_model.kernel_in_dims))
    save_t5_folder(os.path.join(folder, "text_encoder_2"), c.t5,
                   random_params(t5_model.abstract_t5_params(c.t5), seeds[1]), num_shards=2)
    save_clip_text_folder(os.path.join(folder, "text_encoder"), c.clip,
                          random_params(clip_model.abstract_params(c.clip), seeds[2]))
    save_vae_folder(os.path.join(folder, "vae"), c.vae,
                    random_params(vae_model.abstract_params(c.vae), seeds[3]))
    write_scheduler_config(folder, c.scheduler)
    write_model_index(folder)
    return configs
