# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # LeapAlign in JAX: quickstart
#
# This notebook aligns a text-to-image flow model with a differentiable reward using
# LeapAlign, then shows what changed:
#
# 1. **Install** the project on top of the runtime's own JAX.
# 2. **Align the shapes world**: a miniature, offline text-to-image benchmark (32x32
#    images of coloured shapes, a learned reward model, an exact checker). The run
#    takes the world's models as shipped with the project, evaluates the base model on
#    held-out prompts, aligns it, evaluates again and prints a before/after table.
# 3. **Look at the results**: the table, image grids, the reward curve, TensorBoard.
# 4. **Align FLUX.1 with LoRA** from a folder on Drive or GCS, when you have one and an
#    accelerator large enough for it (see the memory notes there).
#
# In Colab pick a runtime under *Runtime > Change runtime type*: the shapes world runs
# on any of them, CPU included (several minutes on 2 CPU cores); a TPU or GPU runtime is
# faster.
#
# Every run goes through the command line, `python -m leapalign_jax.main --config ...
# --workdir ...`, in a subprocess. The notebook's own Python process never imports JAX:
# on a TPU only one process can hold the chip, and it must be the training run.
#
# **Test mode.** With the environment variable `LEAPALIGN_TEST_MODE=1` (set by
# `tests/test_notebook.py`, which runs this notebook on CPU in CI) the notebook uses the
# local checkout without installing anything, runs the seconds-long `:tiny` variant in a
# temporary folder and does not start TensorBoard.

# %%
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

TEST_MODE = os.environ.get("LEAPALIGN_TEST_MODE") == "1"
IN_COLAB = importlib.util.find_spec("google.colab") is not None
# Where Colab clones the code from: set it to your fork or the project's repository.
REPO_URL = os.environ.get("LEAPALIGN_REPO_URL", "https://github.com/<org>/leapalign-jax")
print(f"test mode: {TEST_MODE}, Colab: {IN_COLAB}, Python {sys.version.split()[0]}")

# %% [markdown]
# ## 1. Install
#
# Colab's TPU and GPU runtimes come with `jax`, `jaxlib` and (on TPU) `libtpu` built for
# the attached accelerator. `pip install -r requirements.txt` would replace them with
# the CPU build from PyPI (the file says `jax>=0.10`), and the notebook would silently
# train on the CPU, or fail to find the TPU. So the cell below:
#
# - finds the code: the checkout this notebook sits in, or a fresh clone of `REPO_URL`
#   into `/content/leapalign-jax` in Colab;
# - installs `requirements.txt` **minus** `jax`, `jaxlib`, `libtpu` and the CUDA
#   plugins, with the installed versions of those pinned as pip *constraints*, so that
#   no other package (a newer `flax`, say) can pull in a different JAX either;
# - installs the project itself with `--no-deps`.
#
# The project needs `jax>=0.10`; if the runtime's JAX is older, the cell stops and says
# how to upgrade it. In test mode it only prints what it would install.

# %%
ACCELERATOR_PACKAGES = {"jax", "jaxlib", "libtpu", "libtpu-nightly"}


def find_repo() -> str:
    """The checkout holding this notebook (or $LEAPALIGN_REPO); in Colab, a fresh clone."""
    if os.environ.get("LEAPALIGN_REPO"):
        return os.path.abspath(os.environ["LEAPALIGN_REPO"])
    here = os.path.abspath(os.getcwd())
    for folder in (here, os.path.dirname(here), "/content/leapalign-jax"):
        if os.path.isfile(os.path.join(folder, "leapalign_jax", "main.py")):
            return folder
    if "<org>" in REPO_URL:
        raise RuntimeError("set REPO_URL (or $LEAPALIGN_REPO_URL) to the repository's URL, "
                           "or upload the checkout to /content/leapalign-jax")
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", REPO_URL,
                    "/content/leapalign-jax"], check=True)
    return "/content/leapalign-jax"


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirement_name(line: str) -> str | None:
    """The normalised package name of a requirements line; None for comments and options."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    return match.group(1).lower().replace("_", "-") if match else None


def keep(name: str) -> bool:
    """False for the accelerator stack, which the runtime provides."""
    return name not in ACCELERATOR_PACKAGES and not name.startswith(("jax-cuda", "jax-rocm"))


REPO = find_repo()
os.chdir(REPO)
sys.path.insert(0, REPO)
with open("requirements.txt", encoding="utf-8") as f:
    lines = [line.strip() for line in f]
requirements = [line for line in lines if requirement_name(line) and keep(requirement_name(line))]
pins = [f"{name}=={installed(name)}" for name in sorted(ACCELERATOR_PACKAGES) if installed(name)]
print("repository:", REPO)
print("requirements to install:", " ".join(requirements))
print("kept as installed:", " ".join(pins) or "(no JAX installed yet)")

jax_version = installed("jax")
if jax_version and tuple(int(p) for p in re.findall(r"\d+", jax_version)[:2]) < (0, 10):
    raise RuntimeError(f"the runtime's jax {jax_version} is older than the project's jax>=0.10: "
                       'run `pip install -U "jax[tpu]>=0.10"` (TPU) or `"jax[cuda12]>=0.10"` '
                       "(GPU), restart the runtime, then run this cell again")
if TEST_MODE:
    print("test mode: using the local checkout as it is; nothing installed")
else:
    work = tempfile.mkdtemp()
    for name, items in (("requirements", requirements), ("constraints", pins)):
        with open(os.path.join(work, f"{name}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(items) + "\n")
    if not installed("jax"):  # a bare Python: no accelerator stack to keep, take PyPI's
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "jax>=0.10"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "-r", os.path.join(work, "requirements.txt"),
                    "-c", os.path.join(work, "constraints.txt")], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", REPO],
                   check=True)

# %% [markdown]
# ## 2. Align the shapes world
#
# `configs/toy_leapalign.py` is the project's main job: LeapAlign (two leaps per
# rollout, nested-gradient discount `alpha`, trajectory-similarity weighting) on the
# shapes world, 100 iterations of batch 32 with 25 Euler steps. The world's models (an
# autoencoder as the VAE, a CLIP-style reward model, a pretrained tiny Flux) ship with
# the project and are copied into the cache folder; other world knobs build them there
# on first use (about 40 minutes on 2 CPU cores).
#
# The `:tiny` variant shrinks everything to a seconds-long smoke run (its numbers mean
# nothing); test mode uses it. Running the cell again with the same `WORKDIR` resumes
# from the last checkpoint.

# %%
if TEST_MODE:
    CONFIG = "configs/toy_leapalign.py:tiny"
    WORKDIR = os.environ.get("LEAPALIGN_WORKDIR") or tempfile.mkdtemp(prefix="leapalign-run-")
    CACHE_DIR = os.environ.get("LEAPALIGN_CACHE_DIR") or tempfile.mkdtemp(prefix="leapalign-cache-")
else:
    CONFIG = "configs/toy_leapalign.py"
    WORKDIR = os.environ.get("LEAPALIGN_WORKDIR", "runs/quickstart")
    CACHE_DIR = os.environ.get("LEAPALIGN_CACHE_DIR", "cache/shapes")


def leapalign_main(*args: str) -> None:
    """Runs `python -m leapalign_jax.main ARGS`, showing its output as it comes."""
    command = [sys.executable, "-m", "leapalign_jax.main", *args]
    print("$", " ".join(command), flush=True)
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    while chunk := process.stdout.read1(4096):
        sys.stdout.write(chunk.decode("utf-8", errors="replace"))
        sys.stdout.flush()
    if process.wait():
        raise RuntimeError(f"leapalign_jax.main exited with status {process.returncode}")


leapalign_main("--config", CONFIG, "--workdir", WORKDIR, f"--config.world.cache_dir={CACHE_DIR}")

# %% [markdown]
# ## 3. Results
#
# The run ends with a table of the base model and the aligned EMA params on the
# held-out prompts (also in `WORKDIR/results.md`): the reward model's score, the exact
# checker's accuracy per GenEval-style category and overall, and a Fréchet distance
# (lower is closer to real renders). Each evaluation also keeps its images and scores in
# `WORKDIR/eval/<name>/` (`images/`, `prompts.jsonl`, `results.json`).

# %%
import glob
import json

from IPython.display import Image, Markdown, display

with open(os.path.join(WORKDIR, "results.md"), encoding="utf-8") as f:
    table = f.read()
display(Markdown(table))

evaluations = sorted(glob.glob(os.path.join(WORKDIR, "eval", "step_*")))
results = {}
for name, folder in (("base", os.path.join(WORKDIR, "eval", "base")), ("aligned", evaluations[-1])):
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as f:
        results[name] = json.load(f)
for key in ("reward", "acc_overall", "fd"):
    print(f"{key:12s} base {results['base'][key]:8.4f} -> aligned {results['aligned'][key]:8.4f}")

# %% [markdown]
# Image grids of the evaluation prompts, sampled from the EMA params during training
# (`WORKDIR/images/<step>.png`); the newest one:

# %%
grids = sorted(glob.glob(os.path.join(WORKDIR, "images", "*.png")))
print(grids[-1])
display(Image(filename=grids[-1]))

# %% [markdown]
# The same held-out prompts before and after alignment (same noise), with the checker's
# verdict on each image:

# %%
import matplotlib.pyplot as plt


def read_records(folder: str) -> list[dict]:
    with open(os.path.join(folder, "prompts.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


columns = 8
figure, axes = plt.subplots(2, columns, figsize=(2 * columns, 4.6))
for row, (name, folder) in enumerate((("base", os.path.join(WORKDIR, "eval", "base")),
                                      ("aligned", evaluations[-1]))):
    records = read_records(folder)
    step = max(1, len(records) // columns)  # spread over the categories
    for ax, record in zip(axes[row], records[::step]):
        ax.imshow(plt.imread(os.path.join(folder, record["file"])), interpolation="nearest")
        verdict = "pass" if record.get("passed") else "fail"
        ax.set_title(f"{record['prompt']}\n{name}: {verdict}", fontsize=7)
    for ax in axes[row]:
        ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### Reward curve
#
# Metrics go to TensorBoard event files in the workdir (`leapalign_jax/summaries.py`,
# which needs no TensorFlow): `reward_mean` is the reward of each step's rollouts on training prompts,
# `loss` the LeapAlign loss. They are read here with TensorBoard's own event reader.

# %%
from tensorboard.backend.event_processing import event_accumulator


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every event file under `logdir`."""
    series: dict[str, list[tuple[int, float]]] = {}
    files = glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
    for path in sorted(files):
        events = event_accumulator.EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return {tag: sorted(points) for tag, points in series.items()}


scalars = read_scalars(WORKDIR)
print("metrics:", ", ".join(sorted(scalars)))
figure, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for ax, tag in zip(axes, ("reward_mean", "loss")):
    steps, values = zip(*scalars[tag])
    ax.plot(steps, values, marker="o")
    ax.set_xlabel("step")
    ax.set_title(tag)
    ax.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# ### TensorBoard
#
# All the metrics (leap indices `j_mean`/`k_mean`, trajectory weights, gradient norms,
# step times, and `eval/*` when `--config.train.eval_every` is set) live in TensorBoard.
# Test mode skips starting it.

# %%
if TEST_MODE:
    print(f"test mode: TensorBoard not started (it would show {WORKDIR})")
else:
    # %load_ext tensorboard
    # %tensorboard --logdir {WORKDIR}
    print(f"TensorBoard reads {WORKDIR}, and picks up new metrics as the runs write them")

# %% [markdown]
# Other tasks on the same workdir: `--config.task=sample` writes a PNG grid of the
# evaluation prompts from the newest checkpoint's EMA params to `WORKDIR/samples/`, and
# `--config.task=evaluate` re-runs the held-out evaluation. Variants pick another method
# on the same world (`configs/toy_leapalign.py:refl`, `:draft`, `:draft_lv`, `:drtune`,
# `:alignprop`, `:grpo`); `--config.method.alpha=0.1` and other overrides change one knob.
#
# ## 4. Align FLUX.1 with LoRA
#
# This section aligns a FLUX.1 checkpoint in the diffusers folder layout
# (`model_index.json`, `transformer/`, `text_encoder/`, `text_encoder_2/`, `vae/`, the
# tokenizers) with LoRA adapters on the transformer. Set `FLUX_PATH` to that folder on
# Google Drive (the cell mounts Drive in Colab) or to a `gs://bucket/...` folder. Each
# cell checks first and skips with a message when something is missing: the folder, the
# experiment file `configs/flux_dev.py`, or enough accelerator memory.
#
# **What fits where.**
#
# - FLUX.1-dev's transformer has 12B parameters: 24 GB in bfloat16 for the weights alone
#   (twice that in float32), plus the T5-XXL text encoder (4.7B parameters, 9.5 GB in
#   bfloat16) unless prompt embeddings are precomputed.
# - Colab's single-chip TPU runtime is a v5e-1 with **16 GB** of HBM: even inference of
#   the full FLUX.1-dev transformer does not fit one v5e chip, let alone training.
# - LoRA cuts the trained parameters, their gradients and the AdamW moments to a few
#   million, but the frozen 12B base weights and the activations backpropagated through
#   LeapAlign's two leaps still have to sit in memory. LoRA training of FLUX.1-dev needs
#   a TPU pod slice, with the weights sharded over its chips (FSDP:
#   `--config.mesh.shape=[1,-1,1]`; see `launch/` for TPU VMs), or a larger-memory GPU
#   such as an H100 80 GB.
# - The shapes world and the tiny configs (`configs/toy_leapalign.py:tiny`,
#   `configs/random_flux.py`) fit anywhere, CPU included.
#
# The cell below asks the accelerator how much memory it has (in a subprocess, so the
# notebook does not hold the TPU) and runs only with at least `FLUX_MIN_MEMORY_GB`
# across the local devices, a rule of thumb for the weights, the LoRA state and
# activations; set `FLUX_FORCE=1` to try anyway.

# %%
FLUX_PATH = os.environ.get("FLUX_PATH", "/content/drive/MyDrive/FLUX.1-dev")
FLUX_CONFIG = "configs/flux_dev.py"
FLUX_WORKDIR = os.environ.get("FLUX_WORKDIR", "runs/flux_lora")
LORA_RANK = 16
FLUX_MIN_MEMORY_GB = 48
FLUX_FORCE = os.environ.get("FLUX_FORCE") == "1"

flux_command = ["--config", FLUX_CONFIG, "--workdir", FLUX_WORKDIR,
                f"--config.world.checkpoint={FLUX_PATH}", f"--config.model.lora.rank={LORA_RANK}"]


def folder_exists(path: str) -> bool:
    """True when `path` (local, Drive or gs://) holds a diffusers model_index.json."""
    if path.startswith("gs://"):
        from etils import epath  # reads gs:// as the project's own paths do

        return epath.Path(path).joinpath("model_index.json").exists()
    return os.path.isfile(os.path.join(path, "model_index.json"))


def accelerator_memory_gb() -> tuple[str, float]:
    """(backend, GB of memory over the local devices), asked in a subprocess."""
    probe = ("import jax, json; d = jax.local_devices(); "
             "s = [x.memory_stats() or {} for x in d]; "
             "print(json.dumps([jax.default_backend(), sum(m.get('bytes_limit', 0) for m in s)]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    backend, total = json.loads(out)
    return backend, total / 1e9


def flux_ready() -> bool:
    """Checks the FLUX section's prerequisites, printing why it skips when one is missing."""
    if IN_COLAB and FLUX_PATH.startswith("/content/drive") and not os.path.isdir("/content/drive"):
        from google.colab import drive

        drive.mount("/content/drive")
    if IN_COLAB and FLUX_PATH.startswith("gs://"):
        from google.colab import auth

        auth.authenticate_user()  # lets this runtime read your buckets
    if not folder_exists(FLUX_PATH):
        print(f"skipping the FLUX section: FLUX_PATH={FLUX_PATH} is not a FLUX.1 folder "
              "(no model_index.json there). Set FLUX_PATH to a diffusers-layout FLUX.1 "
              "folder on Drive or GCS to run it.")
        return False
    if not os.path.isfile(FLUX_CONFIG):
        print(f"skipping the FLUX section: {FLUX_CONFIG} is not in this checkout yet.")
        return False
    backend, memory = accelerator_memory_gb()
    if memory < FLUX_MIN_MEMORY_GB and not FLUX_FORCE:
        print(f"skipping the FLUX section: the {backend} devices here have {memory:.0f} GB "
              f"in all; LoRA training of FLUX.1-dev needs about {FLUX_MIN_MEMORY_GB} GB or "
              "more (a TPU pod slice or an 80 GB GPU). Set FLUX_FORCE=1 to try anyway.")
        return False
    return True


print("planned command: python -m leapalign_jax.main " + " ".join(flux_command))
FLUX_READY = flux_ready()
if FLUX_READY:
    leapalign_main(*flux_command)

# %% [markdown]
# After the run, sample the evaluation prompts with the aligned LoRA (same config and
# workdir, `--config.task=sample`) and show the grid:

# %%
if FLUX_READY:
    leapalign_main(*flux_command, "--config.task=sample")
    samples = sorted(glob.glob(os.path.join(FLUX_WORKDIR, "samples", "*.png")))
    display(Image(filename=samples[-1]))
else:
    print("skipped: the FLUX section did not run")
