"""Tiny runs of the cost, accelerator and mechanism benchmarks: they start, compile, time and
report."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cost_benchmark_tiny(tmp_path):
    out = tmp_path / "cost.md"
    out.write_text("old tables\n<!-- notes -->\nhand-written analysis\n")
    run("benchmarks/cost.py", "--tiny", "--steps", "2", "--rounds", "1", "--batch", "2",
        "--side", "2", "--text-len", "4", "--methods", "alignprop", "leapalign",
        "--out", str(out))
    text = out.read_text()
    assert "| LeapAlign |" in text and "| AlignProp (remat) |" in text
    assert "### Goals" in text and "Load average" in text
    assert "old tables" not in text and text.endswith("<!-- notes -->\nhand-written analysis\n")


def test_flux_accelerator_tiny():
    text = run("benchmarks/flux_accelerator.py", "--tiny", "--dtype", "float32",
               "--remat", "none")
    lines = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    assert float(lines["train_s_per_iter"]) > 0
    assert float(lines["train_flops_per_iter"]) > 0
    assert float(lines["jax_rollout_images_per_s"]) > 0
    assert "peak_hbm_gib" in lines and "train_mfu" in lines
    # torch runs the same loop on CPU in --tiny mode; it is optional.
    assert "torch_rollout" in text or "torch_rollout_images_per_s" in lines


def test_mechanism_tiny(tmp_path):
    run("benchmarks/mechanism.py", "--world", "random_flux", "--methods", "leapalign",
        "--batches", "1", "--batch-size", "2", "--num-steps", "3", "--out", str(tmp_path))
    import json

    result = json.loads((tmp_path / "mechanism.json").read_text())
    assert len(result["sigmas"]) == 3 and result["sigmas"][0] == 1.0
    for name in ("leapalign", "random direction"):
        assert abs(sum(result["shares"][name]) - 1.0) < 1e-6
        assert all(e > 0 for e in result["effects"][name])
    assert "| leapalign |" in (tmp_path / "mechanism.md").read_text()
    assert (tmp_path / "mechanism.png").stat().st_size > 1000
