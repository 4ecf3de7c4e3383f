"""Evaluation outputs shared by worlds: image folders, prompt records, Fréchet distance.

`task=evaluate` (leapalign_jax/tasks.py) writes, for the latest checkpoint in the workdir
(or the base model), `DIR/eval/<name>/images/<index>.png`, `prompts.jsonl` (one line per
image: file, prompt, category, the spec asked for) and `results.json`, so an external
checker can score the same images. Folders may be local or gs:// (`paths`); on a pod every
process passes the gathered images and process 0 writes.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import scipy.linalg

from leapalign_jax import paths, sampling


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D), as in FID."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(covmean):  # numerical noise from sqrtm of a near-singular product
        covmean = covmean.real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * covmean))


def write_eval(out_dir: str, images: np.ndarray, records: Sequence[dict[str, Any]],
               results: dict[str, Any]) -> None:
    """Writes images/<index>.png, prompts.jsonl and results.json under `out_dir` (local or
    gs://). Every process calls it with the gathered images; process 0 writes, and
    results.json comes last, so its presence marks a complete folder."""
    if paths.is_writer():
        lines = []
        for index, (image, record) in enumerate(zip(images, records)):
            file = f"images/{index:05d}.png"
            sampling.save_image(image, paths.join(out_dir, file))
            lines.append(json.dumps({"file": file, **record}) + "\n")
        paths.write_text(paths.join(out_dir, "prompts.jsonl"), "".join(lines))
        paths.write_text(paths.join(out_dir, "results.json"),
                         json.dumps(results, indent=2, sort_keys=True))
    paths.barrier(f"eval:{out_dir}")


def read_results(out_dir: str) -> dict[str, Any] | None:
    """The results.json of a finished evaluation folder, or None (decided by process 0 and
    agreed by all, so every process takes the same branch)."""
    done = paths.join(out_dir, "results.json")
    if not paths.agree(paths.exists(done)):
        return None
    return json.loads(paths.read_text(done)) if paths.is_writer() else {}


def summary(name: str, results: dict[str, Any], keys: Sequence[str] = (
        "reward", "acc_overall", "fd")) -> str:
    """One console line for an evaluation: its name and its headline numbers."""
    shown = [k for k in keys if k in results] or sorted(
        k for k, v in results.items() if isinstance(v, float))[:4]
    return f"eval {name}: " + ", ".join(f"{k} {results[k]:.4f}" for k in shown)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per model, one column per metric (union, sorted)."""
    keys = sorted({k for r in rows.values() for k, v in r.items()
                   if isinstance(v, (int, float))})
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in rows.items():
        cells = ["" if k not in r else str(r[k]) if isinstance(r[k], int) else f"{r[k]:.4f}"
                 for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
