"""The paper's comparison table in miniature: every method on the same shapes-world base.

    python benchmarks/compare_methods.py                      # full mode (~1 h on 2 CPU cores)
    python benchmarks/compare_methods.py --quick              # a few minutes, 1 seed
    python benchmarks/compare_methods.py --methods leapalign refl --seeds 0 --steps 40

Every run (LeapAlign, ReFL, DRaFT-LV, DRTune, AlignProp, GRPO, and the LeapAlign ablations
alpha in {0, 0.1, 0.3, 1}, no similarity weight, early-half step range) starts from the
same pretrained shapes-world generator (one shared `--cache-dir`), trains on the same
prompt stream with the same optimizer, EMA, hinge and number of reward evaluations per
iteration, and is judged on the same held-out prompts with the same noise. Every
`--eval-every` iterations the EMA params are evaluated: reward of the training reward
model, exact-checker accuracy (overall and per category), Fréchet distance.

Each (run, seed) trains in its own subprocess, so its peak memory is its own: host RSS
(`resource.getrusage`) and, on an accelerator, `memory_stats()['peak_bytes_in_use']`,
both read after the first training chunk and before any evaluation. Training time counts
optimizer steps only: compilation, checkpointing and evaluation are left out.

Writes to `--out`: `results.md` (mean ± std over seeds), `results.json` (every number,
the command line, the machine) and `accuracy.png` (held-out accuracy against iterations
and against training seconds). A finished (run, seed) is reused on the next invocation
when its settings are unchanged, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIG_FILE = os.path.join(REPO, "configs", "toy_leapalign.py")
MAIN_METHODS = ("leapalign", "refl", "draft_lv", "drtune", "alignprop", "grpo")
ABLATION_ALPHAS = (0.0, 0.1, 0.3, 1.0)
# Quick mode's sampling knobs (T of training and of evaluation); the cached models are the
# full mode's (same cache key), so both modes start from the same pretrained base.
QUICK_WORLD = {"num_steps": 10, "eval_steps": 10}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


# --------------------------------------------------------------------------- the runs


@dataclasses.dataclass(frozen=True)
class Run:
    """One row of the table: a method and its knobs.

    Attributes:
      name: row and folder name (`leapalign_alpha0.1`).
      method: registered method name.
      overrides: `config.method` knobs changed from the method's defaults.
      label: how the row reads in the table and plot.
    """

    name: str
    method: str
    overrides: tuple[tuple[str, Any], ...] = ()
    label: str = ""


def catalog(num_steps: int) -> dict[str, Run]:
    """Every run the benchmark knows, main methods first, then LeapAlign's ablations.

    The alpha ablation equal to LeapAlign's default alpha is the `leapalign` row itself
    and is not run twice.
    """
    from leapalign_jax import methods

    default_alpha = float(methods.default_config("leapalign").alpha)
    runs = [Run(m, m, label=m) for m in MAIN_METHODS]
    runs[0] = Run("leapalign", "leapalign", label=f"leapalign (alpha={default_alpha:g})")
    runs += [Run(f"leapalign_alpha{a:g}", "leapalign", (("alpha", a),), f"  alpha={a:g}")
             for a in ABLATION_ALPHAS if a != default_alpha]
    runs.append(Run("leapalign_noweight", "leapalign", (("use_weight", False),),
                    "  no similarity weight"))
    runs.append(Run("leapalign_early", "leapalign", (("max_idx", num_steps // 2),),
                    f"  steps from [0, T/2={num_steps // 2})"))
    return {r.name: r for r in runs}


def budget_layout(run: Run, batch_size: int) -> tuple[int, dict[str, Any], str]:
    """`(prompts per iteration, extra method knobs, layout)` at `batch_size` reward
    evaluations per iteration.

    Every method scores `batch_size` images per iteration. DRaFT-LV scores n re-noised
    copies of each sample, so it takes the first `batch_size / n` prompts of the step's
    stream; GRPO scores groups of G samples of one prompt, so it takes the first
    `batch_size / G` prompts (its loss repeats them), with G the largest divisor of
    `batch_size` not above its default group size.
    """
    from leapalign_jax import methods

    cfg = methods.default_config(run.method)
    if run.method == "draft_lv":
        n = int(cfg.n)
        if batch_size % n:
            raise ValueError(f"--batch-size {batch_size} is not a multiple of DRaFT-LV's "
                             f"n={n} copies; pick a multiple of {n}")
        return batch_size // n, {}, f"{batch_size // n} prompts x {n} copies"
    if run.method == "grpo":
        g = max((d for d in range(2, int(cfg.group_size) + 1) if batch_size % d == 0),
                default=0)
        if not g:
            raise ValueError(f"--batch-size {batch_size} has no GRPO group size in "
                             f"[2, {cfg.group_size}]; use an even batch size")
        return batch_size, {"group_size": g}, f"{batch_size // g} prompts x {g} samples"
    return batch_size, {}, f"{batch_size} prompts"


def eval_points(steps: int, every: int) -> list[int]:
    """Training steps after which the EMA params are evaluated (always ends at `steps`)."""
    points = list(range(every, steps + 1, every))
    return points if points and points[-1] == steps else points + [steps]


# --------------------------------------------------------------------------- worker


def _maxrss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    scale = 1.0 / 1024 if sys.platform != "darwin" else 1.0 / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _device_peak_mib() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2 ** 20


def world_hash(world) -> str:
    """A digest of the base: generator, frozen judges and the encoded evaluation prompts."""
    import hashlib

    import jax

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves((world.params, world.frozen, world.eval_batch)):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()[:16]


def make_config(job: dict[str, Any]):
    """The training config of one job: the toy experiment, this run's method and knobs."""
    from leapalign_jax import config_lib

    config = config_lib.load_config(f"{CONFIG_FILE}:{job['method']}")
    config.world.cache_dir = job["cache_dir"]
    for key, value in job["world"].items():
        config.world[key] = value
    config.seed = job["seed"]
    config.train.steps = max(1, job["steps"])
    config.train.batch_size = job["batch_size"]
    # Metrics each step make every step synchronous, so the step clock below is exact.
    config.train.log_every = 1
    config.train.image_every = 0
    config.train.checkpoint_every = 10 ** 9  # only at the end of each chunk
    config.train.keep_checkpoints = 1
    for key, value in job["method_overrides"].items():
        config.method[key] = value
    return config


class StepClock:
    """The world's prompt stream, timed: the trainer asks for step s's batch right
    before step s, so consecutive requests bracket one synchronous optimizer step.

    `take` keeps the first `take` prompts of the full stream (DRaFT-LV's share).
    """

    def __init__(self, stream, take: int):
        self.stream, self.take, self.stamps = stream, take, {}

    def __call__(self, step: int):
        import jax

        self.stamps[step] = time.perf_counter()
        return jax.tree.map(lambda a: a[:self.take], self.stream(step))


def step_seconds(chunks: list[dict[str, Any]]) -> tuple[list[float], float, bool]:
    """Training seconds of each chunk, compile seconds in all, and whether steps were timed.

    A chunk of n steps has n stamps; the n - 1 intervals between them bracket its steps
    but the last. The first interval also holds compilation, so it and the last step
    count at the median of all clean intervals (every run's chunks share one compiled
    step). Without any clean interval (chunks of fewer than 3 steps) each chunk counts
    its wall time, compilation included.
    """
    clean = [t for c in chunks for t in c["intervals"][1:]]
    if not clean:
        return [c["wall"] for c in chunks], 0.0, False
    median = float(np.median(clean))
    seconds = [sum(c["intervals"][1:]) + (c["steps"] - len(c["intervals"][1:])) * median
               for c in chunks]
    compiling = sum(max(0.0, c["intervals"][0] - median) for c in chunks if c["intervals"])
    return seconds, compiling, True


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Trains one (run, seed) in chunks, evaluating the EMA params after each chunk."""
    import jax
    from leapalign_jax import config_lib, train
    from leapalign_jax.world import build_world

    t0 = time.perf_counter()
    config = make_config(job)
    world_config = make_config(dict(job, batch_size=job["stream_batch_size"]))
    world = build_world(world_config)  # the stream draws the full batch; see StepClock
    config_lib.validate(config, jax.device_count(), world.pipe.num_steps)
    out = {"job": job, "world_hash": world_hash(world),
           "world_build_s": time.perf_counter() - t0, "baseline_rss_mib": _maxrss_mib()}
    if job["kind"] == "base":
        out["points"] = [{"step": 0, "train_s": 0.0,
                          "results": world.evaluate(world.params, job["eval_dir"])}]
        out["total_s"] = time.perf_counter() - t0
        return out

    clock = StepClock(world.train_batch, job["batch_size"])
    world = dataclasses.replace(world, train_batch=clock)
    points, chunks, done = [], [], 0
    for target in job["eval_points"]:
        config.train.steps = target
        clock.stamps.clear()
        start = time.perf_counter()
        state = jax.block_until_ready(train.train_and_evaluate(config, job["workdir"], world))
        chunks.append({"steps": target - done, "wall": time.perf_counter() - start,
                       "intervals": [clock.stamps[s + 1] - clock.stamps[s]
                                     for s in range(done, target - 1)]})
        done = target
        if "peak_rss_mib_train" not in out:  # before any evaluation adds its own peak
            out["peak_rss_mib_train"] = _maxrss_mib()
            out["device_peak_mib_train"] = _device_peak_mib()
        eval_dir = os.path.join(job["workdir"], "eval", f"step_{target:06d}")
        results = world.evaluate(state.ema_params, eval_dir)
        if target != job["eval_points"][-1]:  # keep the images of the last point only
            shutil.rmtree(os.path.join(eval_dir, "images"), ignore_errors=True)
        points.append({"step": target, "results": results})
        print(f"[{job['run']} seed {job['seed']}] step {target}: acc_overall "
              f"{results['acc_overall']:.3f} reward {results['reward']:.4f}", flush=True)
    seconds, compile_s, timed = step_seconds(chunks)
    for point, total in zip(points, np.cumsum(seconds)):
        point["train_s"] = float(total)
    out.update(points=points, chunks=chunks, train_s=float(sum(seconds)),
               compile_s=compile_s, steps_timed=timed,
               s_per_iter=float(sum(seconds)) / max(1, done), peak_rss_mib=_maxrss_mib(),
               device_peak_mib=_device_peak_mib(), total_s=time.perf_counter() - t0)
    shutil.rmtree(os.path.join(job["workdir"], "checkpoints"), ignore_errors=True)
    return out


def worker_main(job_file: str) -> None:
    with open(job_file, encoding="utf-8") as f:
        job = json.load(f)
    result = run_job(job)
    tmp = job["result_file"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, job["result_file"])


# --------------------------------------------------------------------------- driver


def machine() -> dict[str, Any]:
    import jax

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}


def run_subprocess(job: dict[str, Any], log_path: str, base_hash: str | None = None
                   ) -> dict[str, Any]:
    """Runs one job in a fresh process (its own peak memory).

    A finished result is reused when its job (settings and full config) is unchanged and
    it trained from the base whose digest is `base_hash`; None always reruns.
    """
    if base_hash is not None and os.path.exists(job["result_file"]):
        with open(job["result_file"], encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("job") == job and previous.get("world_hash") == base_hash:
            return previous
    shutil.rmtree(job["workdir"], ignore_errors=True)  # a stale or partial run of this job
    os.makedirs(job["workdir"], exist_ok=True)
    job_file = os.path.join(job["workdir"], "job.json")
    with open(job_file, "w", encoding="utf-8") as f:
        json.dump(job, f, indent=1)
    # A persistent compilation cache: later chunks, seeds and runs of the same method
    # reuse the compiled step instead of recompiling it.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".jax_cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    with open(log_path, "w", encoding="utf-8") as log:
        rc = subprocess.call([sys.executable, os.path.abspath(__file__), "--worker", job_file],
                             stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if rc != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-2000:]
        return {"job": job, "error": f"exit status {rc}; log {log_path}:\n{tail}"}
    with open(job["result_file"], encoding="utf-8") as f:
        return json.load(f)


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None], np.float64)
    if not a.size:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _cell(values: list[float], digits: int) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "n/a"
    n = sum(v is not None for v in values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")


def summarize(rows: dict[str, dict[str, Any]], base: dict[str, Any] | None
              ) -> tuple[str, dict[str, Any]]:
    """The markdown table (final evaluation point, mean ± std over seeds) and its numbers."""
    metrics = ["reward", "acc_overall"] + [f"acc_{c}" for c in CATEGORIES] + ["fd"]
    header = (["method", "prompts/iter", "reward", "acc overall"] + list(CATEGORIES)
              + ["FD", "s/iter", "peak mem MiB", "acc / LeapAlign"])
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    summary: dict[str, Any] = {}
    ref = rows.get("leapalign", {}).get("seeds", {})
    ref_acc = _mean_std([s["points"][-1]["results"]["acc_overall"] for s in ref.values()
                         if "points" in s])[0] if ref else math.nan
    if base is not None:
        r = base["points"][0]["results"]
        cells = ["base (step 0)", "-"] + [_cell([r.get(m)], 4 if m == "reward" else 3)
                                          for m in metrics] + ["-", "-"]
        cells.append(_cell([r["acc_overall"] / ref_acc], 2) if ref_acc > 0 else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    for name, row in rows.items():
        done = [s for s in row["seeds"].values() if "points" in s]
        if not done:
            lines.append(f"| {row['label']} | {row['layout']} | failed: see results.json |"
                         + " |" * (len(header) - 3))
            continue
        final = [s["points"][-1]["results"] for s in done]
        memory = [s.get("device_peak_mib_train") or s["peak_rss_mib_train"] for s in done]
        pairs = {m: _mean_std([f.get(m) for f in final]) for m in metrics}
        pairs["s_per_iter"] = _mean_std([s["s_per_iter"] for s in done])
        pairs["peak_mem_mib"] = _mean_std(memory)
        stats: dict[str, Any] = {k: {"mean": m, "std": sd} for k, (m, sd) in pairs.items()}
        ratio = pairs["acc_overall"][0] / ref_acc if ref_acc > 0 else math.nan
        stats["acc_ratio_to_leapalign"] = ratio
        stats["num_seeds"] = len(done)
        summary[name] = stats
        cells = [row["label"], row["layout"]]
        cells += [_cell([f.get(m) for f in final], 4 if m == "reward" else 3)
                  for m in metrics]
        untimed = "" if all(s.get("steps_timed", True) for s in done) else " *"
        cells += [_cell([s["s_per_iter"] for s in done], 3) + untimed, _cell(memory, 0),
                  "n/a" if math.isnan(ratio) else f"{ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def plot(rows: dict[str, dict[str, Any]], base: dict[str, Any] | None, path: str,
         title: str) -> None:
    """Held-out accuracy (mean over seeds, band ± std) vs iterations and vs seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    tab20 = plt.get_cmap("tab20").colors
    colors = tab20[::2] + tab20[1::2]  # the ten strong colours first
    base_acc = None if base is None else base["points"][0]["results"]["acc_overall"]
    for i, (name, row) in enumerate(rows.items()):
        done = [s for s in row["seeds"].values() if "points" in s]
        if not done:
            continue
        count = min(len(s["points"]) for s in done)
        steps = [0] * (base_acc is not None) + [p["step"] for p in done[0]["points"][:count]]
        acc = np.asarray([[base_acc] * (base_acc is not None)
                          + [p["results"]["acc_overall"] for p in s["points"][:count]]
                          for s in done])
        secs = np.asarray([[0.0] * (base_acc is not None)
                           + [p["train_s"] for p in s["points"][:count]] for s in done])
        mean, std = acc.mean(0), acc.std(0, ddof=1) if len(done) > 1 else 0.0 * acc[0]
        style = dict(color=colors[i % len(colors)], marker="o", markersize=3,
                     linestyle="--" if row["ablation"] else "-", label=row["label"].strip())
        for ax, x in ((axes[0], np.asarray(steps)), (axes[1], secs.mean(0))):
            ax.plot(x, mean, **style)
            if len(done) > 1:
                ax.fill_between(x, mean - std, mean + std, color=style["color"], alpha=0.15)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("training seconds (compilation and evaluation excluded)")
    axes[0].set_ylabel("held-out checker accuracy (overall)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: 1 seed, 4 methods, short sampling, 2 eval points")
    p.add_argument("--methods", nargs="+", default=None,
                   help="runs to compare (names below, or 'main', 'ablations', 'all'); "
                        "default all, quick: leapalign refl draft_lv grpo")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="training seeds (prompt stream and noise); default 0 1 2, quick: 0")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per run; default 50, quick: 10")
    p.add_argument("--batch-size", type=int, default=None,
                   help="reward evaluations per iteration; default 32, quick: 16")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate the EMA params every N steps (>= 3 for exact step "
                        "timing); default 25, quick: 5")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"),
                   help="where results.md, results.json and accuracy.png go")
    p.add_argument("--workdir", default=None,
                   help="checkpoints, evaluation images and logs of every run; default "
                        "runs/compare_methods (quick: runs/compare_methods_quick)")
    p.add_argument("--cache-dir", default=os.path.join(REPO, "cache", "shapes"),
                   help="the shared shapes-world cache (built on first use)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    quick = args.quick
    args.seeds = args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2])
    args.steps = args.steps if args.steps is not None else (10 if quick else 50)
    args.batch_size = args.batch_size if args.batch_size is not None else (16 if quick else 32)
    args.eval_every = args.eval_every if args.eval_every is not None else (
        5 if quick else 25)
    args.workdir = args.workdir or os.path.join(
        REPO, "runs", "compare_methods_quick" if quick else "compare_methods")
    for flag in ("steps", "batch_size", "eval_every"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def select_runs(requested: list[str] | None, quick: bool, runs: dict[str, Run]
                ) -> list[str]:
    groups = {"main": list(MAIN_METHODS), "all": list(runs),
              "ablations": [n for n in runs if n not in MAIN_METHODS]}
    requested = requested or (["leapalign", "refl", "draft_lv", "grpo"] if quick else ["all"])
    chosen: list[str] = []
    for name in requested:
        for n in groups.get(name, [name]):
            if n not in runs:
                raise SystemExit(f"unknown run {n!r}; choose from {list(runs)} or "
                                 f"{list(groups)}")
            if n not in chosen:
                chosen.append(n)
    return chosen


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    from tqdm import tqdm

    from leapalign_jax import config_lib

    started = time.perf_counter()
    world = dict(QUICK_WORLD) if args.quick else {}
    num_steps = world.get("num_steps") or config_lib.load_config(CONFIG_FILE).world.num_steps
    runs = catalog(num_steps)
    names = select_runs(args.methods, args.quick, runs)
    os.makedirs(args.out, exist_ok=True)
    cache_dir = os.path.abspath(args.cache_dir)
    points = eval_points(args.steps, args.eval_every)
    common = {"cache_dir": cache_dir, "world": world, "steps": args.steps,
              "stream_batch_size": args.batch_size}

    def job_of(kind: str, run: str, method: str, seed: int, batch: int,
               overrides: dict[str, Any]) -> dict[str, Any]:
        workdir = os.path.join(os.path.abspath(args.workdir), run, f"seed{seed}")
        job = dict(common, kind=kind, run=run, method=method, seed=seed, batch_size=batch,
                   method_overrides=overrides, eval_points=points, workdir=workdir,
                   eval_dir=os.path.join(workdir, "eval", "base"),
                   result_file=os.path.join(workdir, "result.json"))
        # The full config, so a result is not reused after configs/ or defaults change.
        job["config"] = json.loads(make_config(job).to_json_best_effort())
        return job

    rows: dict[str, dict[str, Any]] = {}
    jobs = [job_of("base", "base", "leapalign", 0, args.batch_size, {})]
    for name in names:
        run = runs[name]
        try:
            batch, extra, layout = budget_layout(run, args.batch_size)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        overrides = dict(run.overrides, **extra)
        rows[name] = {"label": run.label, "method": run.method, "overrides": overrides,
                      "layout": layout, "batch_size": batch, "seeds": {},
                      "ablation": name not in MAIN_METHODS}
        jobs += [job_of("train", name, run.method, seed, batch, overrides)
                 for seed in args.seeds]

    logs = os.path.join(os.path.abspath(args.workdir), "logs")
    os.makedirs(logs, exist_ok=True)
    base = None
    bar = tqdm(jobs, desc="compare", unit="run", dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(f"{job['run']} seed {job['seed']}")
        log = os.path.join(logs, f"{job['run']}-seed{job['seed']}.log")
        # The base is always evaluated afresh: its digest decides which results are reused.
        result = run_subprocess(job, log, None if base is None else base["world_hash"])
        if base is not None and result.get("world_hash", base["world_hash"]) != \
                base["world_hash"]:
            result = {"job": job, "error": "the world cache changed during the benchmark "
                      "(a model was rebuilt); run it again"}
        if "error" in result:
            tqdm.write(f"{job['run']} seed {job['seed']} failed: {result['error']}")
        if job["kind"] == "base":
            base = None if "error" in result else result
            if base is None:
                raise SystemExit("evaluating the base model failed; see the log above")
            continue
        rows[job["run"]]["seeds"][str(job["seed"])] = result
        if "points" in result:
            final = result["points"][-1]["results"]
            tqdm.write(f"{job['run']:>20s} seed {job['seed']}: acc_overall "
                       f"{final['acc_overall']:.3f} reward {final['reward']:.4f} "
                       f"{result['s_per_iter']:.3f} s/iter")

    table, summary = summarize(rows, base)
    wc = config_lib.load_config(CONFIG_FILE).world
    t_eval = world.get("eval_steps", wc.eval_steps)
    per_category = world.get("images_per_category", wc.images_per_category)
    note = (f"{'Quick' if args.quick else 'Full'} mode: {args.steps} iterations, "
            f"{args.batch_size} reward evaluations per iteration, seeds {args.seeds}, "
            f"T={num_steps} training steps, evaluation with {t_eval} steps x "
            f"{per_category} held-out images per category at the EMA params. "
            "Mean ± std over seeds at the last evaluation point; s/iter counts optimizer "
            "steps only; peak memory is the device peak (host RSS on CPU, process "
            "baseline included) after the first training chunk.")
    if " *" in table:
        table += ("\n\n\\* chunks of fewer than 3 steps: s/iter is wall time with "
                  "compilation; use --eval-every 3 or more")
    md = f"# Method comparison on the shapes world\n\n{note}\n\n{table}\n"
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(md)
    record = {"command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
              "argv": sys.argv, "machine": machine(), "settings": {
                  "quick": args.quick, "steps": args.steps, "batch_size": args.batch_size,
                  "eval_every": args.eval_every, "eval_points": points, "seeds": args.seeds,
                  "world_overrides": world, "cache_dir": cache_dir, "num_steps": num_steps},
              "base": base, "runs": rows, "summary": summary,
              "elapsed_s": time.perf_counter() - started}
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, default=float)
    plot(rows, base, os.path.join(args.out, "accuracy.png"), note.split(". Mean")[0])
    print(md)
    print(f"wrote {args.out}/results.md, results.json, accuracy.png in "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
