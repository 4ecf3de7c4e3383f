"""Multi-host tests on one machine: N python processes on localhost form one JAX job.

`run_workers(script, args)` starts N copies of a worker script, each seeing
`devices_per_process` CPU devices, and returns their stdout once all exit cleanly. A worker
calls `initialize()` first, which joins the job through `jax.distributed.initialize` with
gloo CPU collectives, so `jax.devices()` lists all N * devices_per_process devices and
`multihost_utils` collectives work. A worker that fails, or a job that outlives `timeout`,
kills every worker and fails the test with each worker's stderr tail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from tests.devices import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV = ("MULTIHOST_COORDINATOR", "MULTIHOST_NUM_PROCESSES", "MULTIHOST_PROCESS_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, args: Sequence[str] = (), num_processes: int = 2,
                devices_per_process: int = 4, timeout: float = 120.0) -> list[str]:
    """Runs `python script *args` as processes 0..num_processes-1; returns their stdouts."""
    coordinator = f"127.0.0.1:{free_port()}"
    pythonpath = os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH"))))
    procs, logs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i in range(num_processes):
                env = dict(
                    os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=pythonpath,
                    XLA_FLAGS=xla_flags(devices_per_process),
                    **dict(zip(_ENV, (coordinator, str(num_processes), str(i)))))
                out = open(os.path.join(tmp, f"{i}.out"), "w+")
                err = open(os.path.join(tmp, f"{i}.err"), "w+")
                logs.append((out, err))  # files, not pipes: a full pipe would block a worker
                procs.append(subprocess.Popen([sys.executable, script, *map(str, args)],
                                              stdout=out, stderr=err, env=env, cwd=ROOT))
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in procs):
                failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    why = (f"worker {failed[0]} exited with {procs[failed[0]].returncode}"
                           if failed else f"workers still running after {timeout:.0f} s")
                    raise AssertionError(f"{os.path.basename(script)}: {why}\n"
                                         + _tails(procs, logs))
                time.sleep(0.05)
            if any(p.returncode for p in procs):
                raise AssertionError(f"{os.path.basename(script)}: a worker failed\n"
                                     + _tails(procs, logs))
            outputs = []
            for out, _ in logs:
                out.seek(0)
                outputs.append(out.read())
            return outputs
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for out, err in logs:
                out.close()
                err.close()


def _tails(procs: list[subprocess.Popen], logs: list, chars: int = 3000) -> str:
    parts = []
    for i, (p, (_, err)) in enumerate(zip(procs, logs)):
        err.flush()
        err.seek(0)
        parts.append(f"--- worker {i} (exit {p.poll()}) stderr:\n{err.read()[-chars:]}")
    return "\n".join(parts)


def _exit_on_error(kind, value, traceback) -> None:
    sys.__excepthook__(kind, value, traceback)
    sys.stderr.flush()
    os._exit(1)  # skip jax's exit barrier, which would wait for the other workers


def initialize() -> None:
    """Joins the job `run_workers` started (call first in a worker, before using jax).

    An uncaught exception then ends the worker at once: jax's exit-time shutdown would
    otherwise wait for every other worker, so a failure would surface only at the timeout.
    """
    import jax
    sys.excepthook = _exit_on_error
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    coordinator, count, index = (os.environ[k] for k in _ENV)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(count),
                               process_id=int(index), initialization_timeout=60)
