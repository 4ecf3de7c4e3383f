"""The base experiment config, shared by every file in configs/, and its validation.

Config files in configs/ start from `base_config()` and change what their experiment
needs; every knob is documented here, where it is defined.
"""

from __future__ import annotations

import ml_collections

from leapalign_jax import methods, parallel
from leapalign_jax.plan import plan_config
from leapalign_jax.world import lora_knobs, random_flux_config


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


def base_config(method: str = "leapalign") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # train | sample | evaluate | embed (FLUX.1 prompt embeddings) | plan (memory and speed
    # of the train step compiled from shapes, before launch; knobs in config.plan) |
    # export (the newest EMA params, LoRA merged, as a diffusers folder and a BFL file)
    c.task = "train"
    c.export_dir = ""  # task=export's local output folder ("" = DIR/export/step_<N>)
    c.export_dtype = ""  # task=export casts every tensor to it (e.g. "bfloat16"; "" keeps)
    c.seed = 0  # every random stream derives from it by fold_in / named sub-seeds
    c.eval_name = ""  # task=evaluate writes DIR/eval/<eval_name>/ ("" = step_<N>)

    c.world = random_flux_config()  # generator, judges and prompts (see world.py)
    c.method = methods.default_config(method)  # the alignment method and its knobs
    # LoRA adapters instead of full fine-tuning (off: the paper's default); knobs in
    # world.lora_knobs and models/lora.py.
    c.lora = lora_knobs()

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-5  # paper: AdamW lr 1e-5
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-4  # decoupled (AdamW) weight decay
    c.optim.grad_clip = 1.0  # global-norm clipping before AdamW
    c.optim.warmup_steps = 0  # linear warm-up of the learning rate from 0
    c.optim.ema_decay = 0.995  # EMA of the params, used for sampling and evaluation

    c.train = ml_collections.ConfigDict()
    c.train.steps = 300  # optimizer steps (paper: 300 iterations)
    c.train.batch_size = 64  # prompts per step, global over all devices (paper: 64)
    c.train.log_every = 10  # metrics to TensorBoard + log every N steps
    c.train.image_every = 50  # PNG grid of the eval prompts every N steps (0: never)
    # Held-out evaluation of the EMA params every N steps during training, written to
    # DIR/eval/step_<N>/ and to TensorBoard as eval/* (worlds with a judge; 0: only the
    # before/after evaluation), so a run that games the reward is seen while it runs.
    c.train.eval_every = 0
    c.train.checkpoint_every = 50  # orbax checkpoint every N steps (and at the end)
    c.train.keep_checkpoints = 3  # newest N checkpoints are kept
    c.train.max_nonfinite_steps = 10  # stop after this many consecutive skipped steps
    c.train.start_fresh = False  # True: set aside an incompatible checkpoint dir and restart
    # Steps to trace with the JAX profiler (process 0), starting 5 steps after the run
    # (re)starts, into DIR/plugins/profile for TensorBoard (0: off).
    c.train.profile_steps = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = [-1, 1, 1]  # (data, fsdp, tensor); one -1 takes the remaining devices
    # logical axis name -> mesh axis; e.g. [["embed", "fsdp"], ...] for FSDP
    c.mesh.rules = [list(r) for r in parallel.DEFAULT_RULES]

    c.plan = plan_config()  # task=plan: chip, HBM budget, MFU (documented in plan.py)
    return c


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:variant]` as `--config` does (for notebooks and tests)."""
    import importlib.util
    import os

    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found; see configs/ for examples")
    module_spec = importlib.util.spec_from_file_location("_leapalign_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, data_parallel: int, num_steps: int) -> None:
    """Raises ConfigError naming the first bad knob; the jitted core assumes valid input.

    `data_parallel` is the mesh's data x fsdp size, `num_steps` the rollout length T.
    """
    _check(config.task in ("train", "sample", "evaluate", "embed", "plan", "export"),
           f"config.task={config.task!r}: use train, sample, evaluate, embed, plan or export")
    _check(config.task != "embed" or config.world.name == "flux",
           "config.task=embed precomputes FLUX.1 prompt embeddings; use it with "
           "configs/flux_dev.py (world flux)")
    m = config.method
    _check(m.name in methods.names(), f"config.method.name={m.name!r}: use one of "
           f"{methods.names()} (or pick the variant, e.g. --config=configs/x.py:refl)")
    expected = set(methods.default_config(m.name).keys())
    unknown = sorted(set(m.keys()) - expected)
    _check(not unknown, f"config.method has unknown key(s) {unknown} for method {m.name!r};"
           f" valid keys: {sorted(expected)}")
    if "alpha" in m:
        _check(0.0 <= m.alpha <= 1.0, f"config.method.alpha={m.alpha} must be in [0, 1]")
    if "tau" in m:
        _check(m.tau > 0.0, f"config.method.tau={m.tau} must be > 0 (paper: 0.1)")
    if "min_idx" in m:
        hi = num_steps if m.get("max_idx") is None else m.max_idx
        _check(0 <= m.min_idx and hi <= num_steps and hi - m.min_idx >= 2,
               f"config.method step range [{m.min_idx}, {hi}) must hold two distinct steps "
               f"within [0, {num_steps}); fix min_idx / max_idx")
    t = config.train
    for key in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
                "max_nonfinite_steps"):
        _check(t[key] >= 1, f"config.train.{key}={t[key]} must be >= 1")
    _check(t.eval_every >= 0 and t.image_every >= 0 and t.get("profile_steps", 0) >= 0,
           "config.train.eval_every, image_every and profile_steps must be >= 0 (0: off)")
    _check(t.batch_size % data_parallel == 0,
           f"config.train.batch_size={t.batch_size} is not divisible by the {data_parallel} "
           "data-parallel devices of config.mesh.shape; change one of them")
    _check(config.optim.learning_rate > 0, "config.optim.learning_rate must be > 0")
    _check(0.0 <= config.optim.ema_decay < 1.0, "config.optim.ema_decay must be in [0, 1)")
