"""Task dispatch from the command line: task=plan prints a plan or stops with one line."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args):
    return subprocess.run([sys.executable, "-m", "leapalign_jax.main", "--config",
                           "configs/random_flux.py", "--config.task=plan", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_plan_task_prints_the_plan_and_refuses_a_chip_too_small(tmp_path):
    ok = run_main("--workdir", str(tmp_path / "a"))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "Iteration time at MFU" in ok.stdout and "peak" in ok.stdout
    small = run_main("--workdir", str(tmp_path / "b"), "--config.plan.chip=v6e",
                     "--config.plan.hbm_gib=0.0001")
    assert small.returncode == 2 and "Traceback" not in small.stderr
    last = small.stderr.strip().splitlines()[-1]
    assert last.startswith("error: plan:") and "largest term" in last, last
