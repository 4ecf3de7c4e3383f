"""Training on 2 real processes (4 CPU devices each, one 8-device mesh) on localhost.

Each process reads only its rows of the global batch; evaluation is gathered and written
once; SIGTERM to one host stops both at the same step with one checkpoint (exit 42) and
the rerun ends bitwise where an uninterrupted run ends; a host killed outright takes the
other down within the heartbeat timeout instead of hanging it, leaving the last
checkpoint both hosts finished restorable.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from leapalign_jax import config_lib, paths, tasks, train
from leapalign_jax.world import build_world
from tests import multihost
from tests.devices import xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multihost_train_worker.py")
STEPS = 6
# DRaFT-1 compiles fastest; what is tested (rows, agreement, resume) is the same for all.
VARIANT = "draft"
TIMEOUT = 420  # seconds for a whole 2-process job: a hang fails instead of blocking CI
COMMON = [f"--config.train.steps={STEPS}", "--config.train.log_every=1",
          "--config.world.num_steps=4",
          "--config.train.image_every=0"]


def records(outputs):
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def run_job(workdir, markers, *overrides, timeout=TIMEOUT):
    """Both workers to completion (exit 0 each), through the shared harness."""
    os.makedirs(markers, exist_ok=True)
    return records(multihost.run_workers(WORKER, [workdir, markers, 0, VARIANT, *overrides],
                                         num_processes=2, devices_per_process=4,
                                         timeout=timeout))


def start_job(workdir, markers, sleep, *overrides):
    """Both workers, left running, so the test can signal one (env as in run_workers)."""
    os.makedirs(markers, exist_ok=True)
    coordinator = f"127.0.0.1:{multihost.free_port()}"
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=multihost.ROOT,
                   XLA_FLAGS=xla_flags(4),
                   **dict(zip(multihost._ENV, (coordinator, "2", str(i)))))
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, str(workdir), str(markers), str(sleep), VARIANT,
             *overrides],
            cwd=multihost.ROOT, env=env, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE))
    return procs


def wait_for(path, procs, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            outs = finish(procs, 5)
            raise AssertionError(f"no {path}\n" + "\n".join(o[1][-2000:] for o in outs))
        time.sleep(0.05)


def finish(procs, timeout):
    """(exit code, stdout, stderr) of each worker; a worker still alive after `timeout`
    seconds is killed and reported as None."""
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            results.append((None, out, err))
    return results


def checkpoint_steps(workdir):
    return sorted(int(d) for d in paths.listdir(os.path.join(workdir, "checkpoints"))
                  if d.isdigit())


def tiny_config():
    config = config_lib.load_config(
        os.path.join(multihost.ROOT, "configs", f"random_flux.py:{VARIANT}"))
    config.world.num_steps = 4
    return config


def final_params(workdir):
    config = tiny_config()
    world = build_world(config)
    params, step = tasks.latest_params(config, str(workdir), world, field="params")
    return jax.device_get(params), step


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 2-host run: its records, workdir and final params."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    found = run_job(str(workdir), str(workdir.parent / "markers"), *COMMON,
                    "--config.train.image_every=6")
    return found, workdir, final_params(workdir)


def test_each_host_reads_its_rows_and_one_writes_the_evaluation(straight):
    found, workdir, (_, step) = straight
    world = build_world(tiny_config())
    assert step == STEPS and [r["process"] for r in found] == [0, 1]
    assert all(r["devices"] == 8 and r["exit"] == 0 for r in found)
    assert [r["rows"] for r in found] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for s in range(1, STEPS + 1):
        want = world.train_batch(s - 1)["prompt_id"]  # the single-process global batch
        for r in found:
            seen = r["steps"][str(s)]
            assert seen["global_ids"] == want.tolist() and seen["state_step"] == s
            assert seen["local_ids"] == want[r["rows"]].tolist()
    # Evaluation: gathered from both hosts, one folder of 8 images, one table.
    for name in ("base", f"step_{STEPS:06d}"):
        out = workdir / "eval" / name
        results = json.loads((out / "results.json").read_text())
        assert results["num_images"] == 8 == len(os.listdir(out / "images"))
        assert len((out / "prompts.jsonl").read_text().splitlines()) == 8
    assert "| base |" in (workdir / "results.md").read_text()
    assert (workdir / "images" / f"{STEPS:06d}.png").exists()
    assert (workdir / "log.txt").exists() and (workdir / "log-1.txt").exists()


def test_sigterm_to_one_host_stops_both_at_one_step_and_resumes_bitwise(straight, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("WORKER_EVALUATE", "0")
    workdir, markers = tmp_path / "run", tmp_path / "markers"
    procs = start_job(workdir, markers, 1.0, *COMMON, "--config.train.checkpoint_every=100")
    wait_for(markers / "1-2", procs)
    procs[1].send_signal(signal.SIGTERM)  # the host that is not process 0
    outs = finish(procs, TIMEOUT)
    assert [o[0] for o in outs] == [train.PREEMPTED_EXIT_CODE] * 2, outs[0][2][-3000:]
    stopped = [records([o[1]])[0] for o in outs]
    last = [max(map(int, r["steps"])) for r in stopped]
    saved = checkpoint_steps(workdir)
    assert last[0] == last[1] and saved == [last[0]] and 2 <= saved[0] < STEPS, (last, saved)

    again = run_job(str(workdir), str(markers), *COMMON)
    assert min(map(int, again[0]["steps"])) == saved[0] + 1  # resumed, no step repeated
    params, step = final_params(workdir)
    assert step == STEPS
    assert_same(params, straight[2][0])


def test_killed_host_fails_the_other_and_leaves_a_checkpoint(tmp_path, monkeypatch):
    """A SIGKILLed host takes the other down (no hang) and the last checkpoint both hosts
    finished is complete. (Resuming from it is the SIGTERM test's rerun on two hosts and
    test_robustness's SIGKILL-anywhere test on one: not repeated here, ~50 s of CI.)"""
    monkeypatch.setenv("WORKER_EVALUATE", "0")
    workdir, markers = tmp_path / "run", tmp_path / "markers"
    procs = start_job(workdir, markers, 1.0, *COMMON, "--config.train.checkpoint_every=1")
    wait_for(markers / "1-3", procs)
    procs[1].kill()
    t0 = time.monotonic()
    outs = finish(procs, 120)
    # The survivor does not hang: the coordination service notices the missing peer.
    assert outs[0][0] not in (None, 0), outs[0][2][-3000:]
    print(f"survivor exited with {outs[0][0]} after {time.monotonic() - t0:.1f} s")
    saved = checkpoint_steps(workdir)
    assert saved and saved[-1] < STEPS, saved
    _, step = final_params(workdir)  # restorable: the newest complete checkpoint
    assert step == saved[-1]
