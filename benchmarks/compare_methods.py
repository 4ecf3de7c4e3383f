"""The paper's comparison table in miniature: every method on the same shapes-world base.

    python benchmarks/compare_methods.py                      # full mode (~1 h on 2 CPU cores)
    python benchmarks/compare_methods.py --quick              # a few minutes, 1 seed
    python benchmarks/compare_methods.py --methods leapalign refl --seeds 0 --steps 40
    python benchmarks/compare_methods.py --methods leapalign leapalign_anchor refl \
        refl_anchor --learning-rate 1e-4 --steps 300       # does the anchor stop hacking?

Every run (LeapAlign, ReFL, DRaFT-LV, DRTune, AlignProp, GRPO, and LeapAlign's ablations:
alpha in {0, 0.1, 1}, no similarity weight, early-half step range; LeapAlign and ReFL with
the velocity anchor, `method.anchor_coef`, the reward-hacking guard) starts from the same
pretrained shapes-world generator (one shared `--cache-dir`), trains on the same prompt
stream with the same optimizer, EMA, hinge and number of reward evaluations per
iteration, and is judged on the same held-out prompts with the same noise.

Each (run, seed) trains in its own subprocess, so its peak memory (host RSS, or the device
peak on an accelerator, read before the first evaluation) is its own. The trainer's hooks
(`train.Hook`) evaluate the EMA params every `--eval-every` iterations inside the loop and
collect its per-step wall times; training time counts optimizer steps only, the first
(compiling) step at the median of the others.

Writes to `--out`: `results.md` (mean ± std over seeds), `results.json` (every number,
the command line, the machine) and `accuracy.png` (held-out accuracy against iterations
and against training seconds). A finished (run, seed) is reused when its job and the base
are unchanged, so an interrupted benchmark resumes where it stopped.
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
# Quick mode's sampling knobs; the cached models are the full mode's (same cache key).
QUICK_WORLD = {"num_steps": 10, "eval_steps": 10}
ANCHOR_COEF = 1.0  # the anchored runs' method.anchor_coef
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def catalog(num_steps: int) -> dict[str, dict[str, Any]]:
    """name -> {method, overrides, label, ablation}: main methods, then the ablations."""
    runs = {m: {"method": m, "overrides": {}, "label": m} for m in MAIN_METHODS}
    runs["leapalign"]["label"] = "leapalign (alpha=0.3)"
    for a in (0.0, 0.1, 1.0):
        runs[f"leapalign_alpha{a:g}"] = {"method": "leapalign", "overrides": {"alpha": a},
                                         "label": f"  alpha={a:g}"}
    runs["leapalign_noweight"] = {"method": "leapalign", "overrides": {"use_weight": False},
                                  "label": "  no similarity weight"}
    runs["leapalign_early"] = {"method": "leapalign",
                               "overrides": {"max_idx": num_steps // 2},
                               "label": f"  steps from [0, T/2={num_steps // 2})"}
    # The reward-hacking guard: a velocity anchor to the base (method.anchor_coef).
    for m in ("leapalign", "refl"):
        runs[f"{m}_anchor"] = {"method": m, "overrides": {"anchor_coef": ANCHOR_COEF},
                               "label": f"  {m} + anchor {ANCHOR_COEF:g}"}
    for name, run in runs.items():
        run["ablation"] = name not in MAIN_METHODS
    return runs


def budget_layout(method: str, batch_size: int) -> tuple[int, dict[str, Any], str]:
    """`(prompts per iteration, extra method knobs, layout)` at `batch_size` reward
    evaluations per iteration: DRaFT-LV scores n re-noised copies of each prompt, GRPO
    groups of G samples (G the largest divisor of the batch up to its default)."""
    from leapalign_jax import methods

    cfg = methods.default_config(method)
    if method == "draft_lv":
        if batch_size % cfg.n:
            raise ValueError(f"--batch-size {batch_size} is not a multiple of DRaFT-LV's "
                             f"n={cfg.n} copies")
        return batch_size // cfg.n, {}, f"{batch_size // cfg.n} prompts x {cfg.n} copies"
    if method == "grpo":
        g = max((d for d in range(2, cfg.group_size + 1) if batch_size % d == 0), default=0)
        if not g:
            raise ValueError(f"--batch-size {batch_size} has no GRPO group size; use an "
                             "even batch size")
        return batch_size, {"group_size": g}, f"{batch_size // g} prompts x {g} samples"
    return batch_size, {}, f"{batch_size} prompts"


# --------------------------------------------------------------------------- worker


def _maxrss_mib() -> float:
    scale = 1.0 / 1024 if sys.platform != "darwin" else 1.0 / 2 ** 20  # KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _peak_mib() -> float:
    """The device's peak bytes where it reports them (accelerators), else host RSS."""
    import jax

    peak = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return _maxrss_mib() if peak is None else peak / 2 ** 20


def world_hash(world) -> str:
    """A digest of the base: generator, frozen judges and the encoded evaluation prompts."""
    import hashlib

    import jax

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves((world.params, world.frozen, world.eval_batch)):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()[:16]


def make_config(job: dict[str, Any]):
    """The toy experiment with this job's method, seed, world and method knobs."""
    from leapalign_jax import config_lib

    config = config_lib.load_config(f"{CONFIG_FILE}:{job['method']}")
    config.world.cache_dir = job["cache_dir"]
    config.world.update(job["world"])
    if job.get("anchor_coef") is not None and "anchor_coef" in config.method:
        config.method.anchor_coef = job["anchor_coef"]  # a run's own override wins
    config.method.update(job["overrides"])
    config.seed = job["seed"]
    config.train.update(steps=job["steps"], batch_size=job["batch_size"], image_every=0,
                        checkpoint_every=10 ** 9, keep_checkpoints=1)
    if job.get("learning_rate"):
        config.optim.learning_rate = job["learning_rate"]
    if job.get("hinge_lambda") is not None:
        config.method.hinge_lambda = job["hinge_lambda"]
    return config


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Evaluates the base, or trains one (run, seed) with evaluation hooks."""
    import jax

    from leapalign_jax import config_lib, train
    from leapalign_jax.world import build_world

    # The world draws the full batch, so every method sees the same prompt stream; a
    # method scoring several images per prompt takes the first `prompts` of it.
    config = make_config(job)
    world = build_world(config)
    out = {"job": job, "world_hash": world_hash(world)}
    if job["kind"] == "base":
        out["points"] = [{"step": 0, "train_s": 0.0,
                          "results": world.evaluate(world.params, job["eval_dir"])}]
        return out
    stream, take = world.train_batch, job["prompts"]
    world = dataclasses.replace(world, train_batch=lambda step: jax.tree.map(
        lambda a: a[:take], stream(step)))
    config.train.batch_size = take
    config_lib.validate(config, jax.device_count(), world.pipe.num_steps)
    times, points = [], []

    def clock(step, state, metrics):
        times.append(metrics["step_time_s"])

    def evaluate(step, state, metrics):
        if step not in job["eval_points"]:
            return None
        out.setdefault("peak_mib", _peak_mib())  # before any evaluation adds its own peak
        clean = float(np.median(times[1:])) if len(times) > 1 else times[0]
        eval_dir = os.path.join(job["workdir"], "eval", f"step_{step:06d}")
        results = world.evaluate(state.ema_params, eval_dir)
        if step != job["eval_points"][-1]:  # keep the images of the last point only
            shutil.rmtree(os.path.join(eval_dir, "images"), ignore_errors=True)
        points.append({"step": step, "train_s": sum(times[1:]) + clean, "results": results})
        print(f"[{job['run']} seed {job['seed']}] step {step}: acc_overall "
              f"{results['acc_overall']:.3f} reward {results['reward']:.4f}", flush=True)
        return {f"eval/{k}": v for k, v in results.items() if isinstance(v, float)}

    train.train_and_evaluate(config, job["workdir"], world,
                             hooks=[train.Hook(clock), train.Hook(evaluate)])
    shutil.rmtree(os.path.join(job["workdir"], "checkpoints"), ignore_errors=True)
    return dict(out, points=points, s_per_iter=points[-1]["train_s"] / len(times))


def run_subprocess(job: dict[str, Any], log_path: str, base_hash: str | None) -> dict:
    """Runs one job in a fresh process, or reuses its finished result (same job, same base)."""
    if base_hash and os.path.exists(job["result_file"]):
        with open(job["result_file"], encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("job") == job and previous.get("world_hash") == base_hash:
            return previous
    shutil.rmtree(job["workdir"], ignore_errors=True)  # a stale or partial run of this job
    os.makedirs(job["workdir"])
    job_file = os.path.join(job["workdir"], "job.json")
    with open(job_file, "w", encoding="utf-8") as f:
        json.dump(job, f)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               JAX_COMPILATION_CACHE_DIR=os.path.join(REPO, ".jax_cache"))
    with open(log_path, "w", encoding="utf-8") as log:
        rc = subprocess.call([sys.executable, os.path.abspath(__file__), "--worker", job_file],
                             stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if rc:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            return {"job": job, "error": f"exit status {rc}; log {log_path}:\n{f.read()[-2000:]}"}
    with open(job["result_file"], encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- report


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _cell(values: list[float], digits: int) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")


def _gain(mean: float, se: float) -> str:
    return f"{mean:+.3f}" + ("" if math.isnan(se) else f" ± {se:.3f}")


def summarize(rows: dict[str, dict[str, Any]], base: dict[str, Any]) -> tuple[str, dict]:
    """The markdown table (last evaluation point, mean ± std over seeds) and its numbers."""
    metrics = ["reward", "acc_overall"] + [f"acc_{c}" for c in CATEGORIES] + ["fd"]
    header = (["method", "prompts/iter", "reward", "acc overall", "gain ± s.e.", *CATEGORIES,
               "FD", "s/iter", "peak mem MiB", "acc / LeapAlign"])
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    finals = {name: [s["points"][-1]["results"] for s in row["seeds"].values() if "points" in s]
              for name, row in rows.items()}
    ref = _mean_std([f["acc_overall"] for f in finals.get("leapalign", [])])[0] \
        if finals.get("leapalign") else math.nan
    r = base["points"][0]["results"]
    cells = [_cell([r[m]], 4 if m == "reward" else 3) for m in metrics]
    lines.append("| " + " | ".join(["base (step 0)", "-"] + cells[:2] + ["-"] + cells[2:] + [
        "-", "-", f"{r['acc_overall'] / ref:.2f}"]) + " |")
    summary = {}
    for name, row in rows.items():
        done = [s for s in row["seeds"].values() if "points" in s]
        if not done:
            lines.append(f"| {row['label']} | {row['layout']} | failed: see results.json |")
            continue
        columns = {m: [f[m] for f in finals[name]] for m in metrics}
        columns["s_per_iter"] = [s["s_per_iter"] for s in done]
        columns["peak_mib"] = [s["peak_mib"] for s in done]
        ratio = _mean_std(columns["acc_overall"])[0] / ref
        summary[name] = {k: dict(zip(("mean", "std"), _mean_std(v))) for k, v in columns.items()}
        summary[name].update(acc_ratio_to_leapalign=ratio, num_seeds=len(done))
        gain = np.asarray(columns["acc_overall"]) - r["acc_overall"]
        se = float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else math.nan
        summary[name].update(gain=float(gain.mean()), gain_se=se)
        cells = [_cell(columns[m], 4 if m == "reward" else 3) for m in metrics]
        cells = [row["label"], row["layout"]] + cells[:2] + [_gain(gain.mean(), se)] + cells[2:]
        cells += [_cell(columns["s_per_iter"], 3), _cell(columns["peak_mib"], 0), f"{ratio:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def accuracy_within(seed: dict[str, Any], budget_s: float, base_acc: float) -> tuple[float, int]:
    """(held-out accuracy, iterations) at the last evaluation point reached within
    `budget_s` training seconds; the base's when none was."""
    reached = [p for p in seed["points"] if p["train_s"] <= budget_s * 1.0001]
    return (reached[-1]["results"]["acc_overall"], reached[-1]["step"]) if reached \
        else (base_acc, 0)


def equal_time(rows: dict[str, dict[str, Any]], base: dict[str, Any]) -> tuple[str, dict]:
    """Each run's accuracy at LeapAlign's training time (its slowest seed's; the shortest
    run's when LeapAlign is not compared): the gain over the base, ± its standard error
    over seeds, in that many seconds. A run is scored at its last evaluation point within
    the budget, or as the base when it reached none."""
    base_acc = base["points"][0]["results"]["acc_overall"]
    done = {name: [s for s in row["seeds"].values() if "points" in s]
            for name, row in rows.items()}
    done = {name: seeds for name, seeds in done.items() if seeds}
    # A run's time is its slowest seed's, so that the reference run reaches its own end.
    finals = {name: max(s["points"][-1]["train_s"] for s in seeds)
              for name, seeds in done.items()}
    if not finals:
        return "", {}
    budget = finals.get("leapalign", min(finals.values()))
    lines = [f"Training-time budget: {budget:.1f} s (compilation and evaluation excluded).", "",
             "| method | iterations reached | acc overall | gain over base ± s.e. | gain / s.e. |",
             "|---|---|---|---|---|"]
    summary = {}
    for name, seeds in done.items():
        accs, iters = zip(*(accuracy_within(s, budget, base_acc) for s in seeds))
        gain = np.asarray(accs) - base_acc
        se = float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else math.nan
        summary[name] = {"acc": float(np.mean(accs)), "gain": float(gain.mean()), "se": se,
                         "iterations": [int(i) for i in iters], "budget_s": float(budget)}
        lines.append(f"| {rows[name]['label']} | {'/'.join(map(str, iters))} | "
                     f"{_cell(list(accs), 3)} | {_gain(gain.mean(), se)} | "
                     f"{f'{gain.mean() / se:.1f}' if se > 0 else '-'} |")
    return "\n".join(lines), summary


def plot(rows: dict[str, dict[str, Any]], base: dict[str, Any], path: str, title: str) -> None:
    """Held-out accuracy (mean over seeds, band ± std) vs iterations and vs seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    colors = plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]
    base_acc = base["points"][0]["results"]["acc_overall"]
    for i, row in enumerate(rows.values()):
        done = [s for s in row["seeds"].values() if "points" in s]
        if not done:
            continue
        n = min(len(s["points"]) for s in done)
        acc = np.asarray([[base_acc] + [p["results"]["acc_overall"] for p in s["points"][:n]]
                          for s in done])
        secs = np.asarray([[0.0] + [p["train_s"] for p in s["points"][:n]] for s in done])
        steps = np.asarray([0] + [p["step"] for p in done[0]["points"][:n]])
        mean, std = acc.mean(0), acc.std(0)
        style = dict(color=colors[i % len(colors)], marker="o", markersize=3,
                     linestyle="--" if row["ablation"] else "-", label=row["label"].strip())
        for ax, x in ((axes[0], steps), (axes[1], secs.mean(0))):
            ax.plot(x, mean, **style)
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


def cpu_description(cpuinfo: str, fallback: str = "") -> str:
    """'<model name> (family F, model M, <widest of avx512f | avx2 | avx>)' from the text
    of /proc/cpuinfo (its first processor); `fallback` without a model name."""
    info: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    cpu = info.get("model name") or fallback
    if "cpu family" not in info:
        return cpu
    # XLA compiles for the host's vector width, so training may round differently on an
    # AVX-512 CPU than on an AVX2 one of the same name: results record which.
    flags = set(info.get("flags", "").split())
    isa = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no avx")
    return f"{cpu} (family {info['cpu family']}, model {info.get('model', '?')}, {isa})"


def machine() -> dict[str, Any]:
    import jax

    cpuinfo = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpuinfo = f.read()
    return {"platform": platform.platform(),
            "cpu": cpu_description(cpuinfo, platform.processor()),
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()]}


# --------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: 1 seed, 4 methods, short sampling, 2 eval points")
    p.add_argument("--methods", nargs="+", default=None,
                   help="runs to compare (names, or 'main', 'ablations', 'all'); default "
                        "all, quick: leapalign refl draft_lv grpo")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="training seeds (prompt stream and noise); default 0 1 2, quick: 0")
    p.add_argument("--steps", type=int, default=None, help="iterations; default 50, quick: 10")
    p.add_argument("--batch-size", type=int, default=None,
                   help="reward evaluations per iteration; default 32, quick: 16")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate the EMA params every N steps; default 25, quick: 5")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="AdamW learning rate of every run (default: the config's)")
    p.add_argument("--hinge-lambda", type=float, default=None,
                   help="lambda of every run's hinge max(0, lambda - r) (default: the "
                        "config's, 1.0; GRPO has no hinge)")
    p.add_argument("--anchor-coef", type=float, default=None,
                   help="velocity anchor to the base of every direct-gradient run "
                        "(method.anchor_coef; default: the config's, 0; GRPO has none)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"),
                   help="where results.md, results.json and accuracy.png go")
    p.add_argument("--workdir", default=None, help="runs and logs; default "
                   "runs/compare_methods (quick: runs/compare_methods_quick)")
    p.add_argument("--cache-dir", default=os.path.join(REPO, "cache", "shapes"),
                   help="the shared shapes-world cache (built on first use)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(seeds=[0] if quick else [0, 1, 2], steps=10 if quick else 50,
                    batch_size=16 if quick else 32, eval_every=5 if quick else 25,
                    workdir=os.path.join(REPO, "runs", "compare_methods" + "_quick" * quick))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.steps, args.batch_size, args.eval_every) < 1:
        p.error("--steps, --batch-size and --eval-every must be >= 1")
    return args


def select_runs(requested: list[str] | None, quick: bool, runs: dict) -> list[str]:
    groups = {"main": list(MAIN_METHODS), "all": list(runs),
              "ablations": [n for n in runs if n not in MAIN_METHODS]}
    requested = requested or (["leapalign", "refl", "draft_lv", "grpo"] if quick else ["all"])
    chosen = [n for name in requested for n in groups.get(name, [name])]
    unknown = [n for n in chosen if n not in runs]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; choose from {list(runs)} or {list(groups)}")
    return list(dict.fromkeys(chosen))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        with open(args.worker, encoding="utf-8") as f:
            job = json.load(f)
        result = run_job(job)
        with open(job["result_file"] + ".tmp", "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        os.replace(job["result_file"] + ".tmp", job["result_file"])
        return
    from tqdm import tqdm

    from leapalign_jax import config_lib

    started = time.perf_counter()
    world = dict(QUICK_WORLD) if args.quick else {}
    wc = config_lib.load_config(CONFIG_FILE).world
    num_steps = world.get("num_steps", wc.num_steps)
    runs = catalog(num_steps)
    names = select_runs(args.methods, args.quick, runs)
    points = list(range(args.eval_every, args.steps, args.eval_every)) + [args.steps]
    workdir = os.path.abspath(args.workdir)

    def job_of(kind, run, method, seed, prompts, overrides, layout=""):
        folder = os.path.join(workdir, run, f"seed{seed}")
        return dict(kind=kind, run=run, method=method, seed=seed, prompts=prompts,
                    overrides=overrides, layout=layout, eval_points=points,
                    cache_dir=os.path.abspath(args.cache_dir), world=world,
                    steps=args.steps, batch_size=args.batch_size, workdir=folder,
                    learning_rate=args.learning_rate, hinge_lambda=args.hinge_lambda,
                    anchor_coef=args.anchor_coef,
                    eval_dir=os.path.join(folder, "eval", "base"),
                    result_file=os.path.join(folder, "result.json"))

    jobs = [job_of("base", "base", "leapalign", 0, args.batch_size, {})]
    rows = {}
    for name in names:
        run = runs[name]
        try:
            prompts, extra, layout = budget_layout(run["method"], args.batch_size)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        overrides = dict(run["overrides"], **extra)
        rows[name] = dict(run, overrides=overrides, layout=layout, seeds={})
        jobs += [job_of("train", name, run["method"], seed, prompts, overrides, layout)
                 for seed in args.seeds]
    for job in jobs:  # the full config, so no result is reused after configs/ change
        job["config"] = json.loads(make_config(job).to_json_best_effort())

    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    base = None
    bar = tqdm(jobs, desc="compare", unit="run", dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(f"{job['run']} seed {job['seed']}")
        log = os.path.join(workdir, "logs", f"{job['run']}-seed{job['seed']}.log")
        # The base is always evaluated afresh: its digest decides which results are reused.
        result = run_subprocess(job, log, base and base["world_hash"])
        if base and result.get("world_hash", base["world_hash"]) != base["world_hash"]:
            result = {"job": job, "error": "the world cache changed during the benchmark"}
        if "error" in result:
            tqdm.write(f"{job['run']} seed {job['seed']} failed: {result['error']}")
            if job["kind"] == "base":
                raise SystemExit("evaluating the base model failed; see the log above")
        elif job["kind"] == "base":
            base = result
        else:
            rows[job["run"]]["seeds"][str(job["seed"])] = result
            final = result["points"][-1]["results"]
            tqdm.write(f"{job['run']:>20s} seed {job['seed']}: acc_overall "
                       f"{final['acc_overall']:.3f} reward {final['reward']:.4f} "
                       f"{result['s_per_iter']:.3f} s/iter")

    table, summary = summarize(rows, base)
    note = (f"{'Quick' if args.quick else 'Full'} mode: {args.steps} iterations, "
            f"{args.batch_size} reward evaluations per iteration, seeds {args.seeds}, "
            f"T={num_steps} training steps, "
            + (f"learning rate {args.learning_rate:g}, " if args.learning_rate else "")
            + (f"hinge lambda {args.hinge_lambda:g}, " if args.hinge_lambda is not None else "")
            + (f"velocity anchor {args.anchor_coef:g} (direct-gradient methods), "
               if args.anchor_coef is not None else "")
            + "evaluation with "
            f"{world.get('eval_steps', wc.eval_steps)} steps x {wc.images_per_category} "
            "held-out images per category at the EMA params. Mean ± std over seeds at the "
            "last evaluation point; s/iter counts optimizer steps only; peak memory is the "
            "device peak (host RSS on CPU, process baseline included) before the first "
            "evaluation.")
    timed, timed_summary = equal_time(rows, base)
    md = (f"# Method comparison on the shapes world\n\n{note}\n\n## At equal iterations\n\n"
          f"{table}\n\n## At equal training time\n\n{timed}\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(md)
    record = {"command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
              "machine": machine(), "settings": {k: v for k, v in vars(args).items()
                                                 if k != "worker"},
              "base": base, "runs": rows, "summary": summary, "equal_time": timed_summary,
              "elapsed_s": time.perf_counter() - started}
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, default=float)
    plot(rows, base, os.path.join(args.out, "accuracy.png"), note.split(". Mean")[0])
    print(md)
    print(f"wrote {args.out}/results.md, results.json, accuracy.png in "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
