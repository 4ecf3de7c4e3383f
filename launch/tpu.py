"""Cloud TPU VM launcher: create, set up, run (and rerun after preemption), watch, delete.

    python -m launch.tpu create --name NAME --zone ZONE --accelerator-type v5p-16 --spot
    python -m launch.tpu run --name NAME --zone ZONE --config configs/toy_leapalign.py \
        --workdir gs://BUCKET/run [--config.KEY=VALUE ...]

Every remote action is a `gcloud compute tpus ...` command built by a pure function below
and executed by one `Runner`; under `--dry-run` a `DryRunner` prints each command instead
(exactly as it would run) and answers with a small simulated VM, so the rerun-after-
preemption and recreate-a-lost-VM paths run without gcloud (`--simulate 42,lost,0`).
Standard library only: it runs on a laptop without the project's dependencies.

A run is detached on every worker (a background shell ignoring SIGHUP, as nohup does;
one log and one exit-status file per worker), so a dropped ssh connection does not stop
it; the monitor loop polls the status
files and reruns the same command after exit status 42 (SIGTERM -> checkpoint -> exit 42
in `leapalign_jax.train`) or after the VM is lost, which resumes from the workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import threading
import time
from typing import Callable, Sequence, TextIO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Remote layout, the same on every worker. `$HOME` is expanded by the remote shell, so
# these paths go into scripts unquoted (they hold no spaces or shell metacharacters).
CODE_DIR = "$HOME/leapalign_jax"
VENV_DIR = "$HOME/leapalign_venv"
RUN_DIR = "$HOME/leapalign_run"
LOG_FILE = RUN_DIR + "/main.log"
STATUS_FILE = RUN_DIR + "/exit_status"
SETUP_MARKER = VENV_DIR + "/.leapalign_setup"
REMOTE_ARCHIVE = "/tmp/leapalign_jax.tgz"
REMOTE_REQUIREMENTS = "/tmp/leapalign_requirements.txt"
# A regex for the training processes that does not match its own text, so the ssh shell
# running a script that holds it is never killed (pkill) or counted (pgrep) by it.
PROCESS_PATTERN = "leapalign_jax[.]main"
STATUS_MARKER = "leapalign-status"
# leapalign_jax.train.PREEMPTED_EXIT_CODE (not imported: this module must not need jax).
PREEMPTED_EXIT_CODE = 42
# A metrics line of the log file (leapalign_jax/summaries.py): "... summaries.py:64] [STEP] k=v, ...".
METRICS_REGEX = r"\] \[[0-9]+\] "

LOST_STATES = ("PREEMPTED", "TERMINATED", "MISSING")
STUCK_STATES = ("STOPPED", "STOPPING", "HIDING", "HIDDEN", "SUSPENDED", "SUSPENDING")
DEFAULT_VERSION = "tpu-ubuntu2204-base"
# Runtime images recommended per TPU generation (accelerator-type prefix).
RUNTIME_VERSIONS = {
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
CAPACITY_ERROR = re.compile(
    r"capacity|RESOURCE_EXHAUSTED|stockout|resource pool exhausted|"
    r"resources? (?:is|are) (?:currently )?(?:not available|unavailable)", re.IGNORECASE)
ALREADY_EXISTS = re.compile(r"ALREADY_EXISTS|already exists", re.IGNORECASE)
NOT_FOUND = re.compile(r"NOT_FOUND")
MAX_BACKOFF_S = 900
TPU_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# A version string safe to write unquoted into a remote script (0.10.2, 3.11, 0.5.0rc1).
VERSION = re.compile(r"[0-9][0-9A-Za-z.+!-]*")


class LaunchError(Exception):
    """A failure reported as one line, `error: <message>`, with exit status `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Vm:
    """Which TPU VM: its name, zone and (optional) project."""

    name: str
    zone: str
    project: str | None = None


@dataclasses.dataclass(frozen=True)
class Machine:
    """How to (re)create the VM; `None` fields are learned from the running VM if any."""

    accelerator_type: str | None = None
    version: str | None = None
    spot: bool = False
    queued: bool = False

    @property
    def runtime_version(self) -> str:
        return self.version or default_version(self.accelerator_type or "")


@dataclasses.dataclass(frozen=True)
class VmInfo:
    """What `tpu-vm describe` says; state "MISSING" when the VM does not exist."""

    state: str
    accelerator_type: str = ""
    version: str = ""
    spot: bool = False
    queued: bool = False
    error: str = ""  # gcloud's last stderr line when describe failed

    @property
    def lost(self) -> bool:
        return self.state in LOST_STATES


@dataclasses.dataclass
class Result:
    """A finished command: exit status, captured stdout, stderr."""

    code: int
    stdout: str = ""
    stderr: str = ""


@dataclasses.dataclass(frozen=True)
class WorkerStatus:
    """One worker's line of `worker_status_script`: exit status or running/vanished."""

    status: str
    host: str = ""
    metrics: str = ""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one attempt of the run ended: done, failed, preempted, vanished or lost."""

    kind: str
    code: int | None = None

    @property
    def reason(self) -> str:
        return {"done": "finished", "failed": f"failed with exit status {self.code}",
                "preempted": f"preempted (exit status {PREEMPTED_EXIT_CODE})",
                "vanished": "stopped without an exit status (worker restarted?)",
                "lost": "lost with its VM"}[self.kind]


# ---------------------------------------------------------------------------------------
# Pure builders: gcloud commands (argv lists) and the remote scripts they carry.


def default_version(accelerator_type: str) -> str:
    """The runtime image for a TPU generation, e.g. v5p-16 -> v2-alpha-tpuv5."""
    return RUNTIME_VERSIONS.get(accelerator_type.split("-")[0], DEFAULT_VERSION)


def gcloud(vm: Vm, words: Sequence[str], args: Sequence[str] = (),
           flags: Sequence[str] = ()) -> list[str]:
    """`gcloud compute tpus WORDS ARGS(default: the VM name) --zone=Z [--project=P] FLAGS
    --quiet` (--quiet: never prompt, the monitor runs unattended)."""
    project = [f"--project={vm.project}"] if vm.project else []
    return ["gcloud", "compute", "tpus", *words, *(args or [vm.name]), f"--zone={vm.zone}",
            *project, *flags, "--quiet"]


def create_command(vm: Vm, machine: Machine) -> list[str]:
    """A TPU VM, or with `queued` a queued resource holding one node named like the VM."""
    spot = ["--spot"] if machine.spot else []
    if machine.queued:
        return gcloud(vm, ["queued-resources", "create"], flags=[
            f"--node-id={vm.name}", f"--accelerator-type={machine.accelerator_type}",
            f"--runtime-version={machine.runtime_version}", *spot])
    return gcloud(vm, ["tpu-vm", "create"], flags=[
        f"--accelerator-type={machine.accelerator_type}",
        f"--version={machine.runtime_version}", *spot])


def describe_command(vm: Vm) -> list[str]:
    return gcloud(vm, ["tpu-vm", "describe"], flags=["--format=json"])


def queued_state_command(vm: Vm) -> list[str]:
    return gcloud(vm, ["queued-resources", "describe"], flags=["--format=value(state.state)"])


def delete_command(vm: Vm, queued: bool) -> list[str]:
    """Deletes the VM; for a queued resource `--force` deletes its node with it."""
    if queued:
        return gcloud(vm, ["queued-resources", "delete"], flags=["--force"])
    return gcloud(vm, ["tpu-vm", "delete"])


def ssh_command(vm: Vm, script: str, worker: str = "all") -> list[str]:
    """Runs `script` (one line, read by the remote login shell) on `worker`."""
    return gcloud(vm, ["tpu-vm", "ssh"], flags=[f"--worker={worker}", "--command", script])


def scp_command(vm: Vm, source: str, dest: str, worker: str = "all") -> list[str]:
    return gcloud(vm, ["tpu-vm", "scp"], [source, f"{vm.name}:{dest}"], [f"--worker={worker}"])


def tree_files(repo: str) -> list[str]:
    """The working tree's tracked and untracked-but-not-ignored files that exist.

    Uncommitted edits travel (unlike `git archive`); ignored outputs (runs/, caches) do
    not; a tracked file deleted locally is skipped.
    """
    try:
        listing = subprocess.run(
            ["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        detail = last_line(getattr(e, "stderr", "") or str(e))
        raise LaunchError(f"cannot list the files of {repo}: {detail} (outside a git "
                          "checkout, use --git-ref REF --repo URL)", 2) from e
    names = {name for name in listing.split("\0") if name}
    return sorted(n for n in names if os.path.lexists(os.path.join(repo, n)))


def pack_tree(repo: str, archive: str) -> None:
    """Writes the files of `tree_files` into a .tgz (tarfile: the same on Linux and macOS)."""
    with tarfile.open(archive, "w:gz") as tar:
        for name in tree_files(repo):
            tar.add(os.path.join(repo, name), arcname=name, recursive=False)


def train_argv(config: str, workdir: str, overrides: Sequence[str]) -> list[str]:
    """The arguments of the remote `python`, identical on every rerun (so it resumes)."""
    return ["-m", "leapalign_jax.main", "--config", config, "--workdir", workdir,
            *overrides]


def script(*statements: str) -> str:
    """One shell line: `--command` scripts stay on one line in dry-run output.

    A statement ending in `&` (background) is followed by a space, not `;`.
    """
    return "".join(s + (" " if s.endswith("&") else "; ") for s in statements[:-1]) + (
        statements[-1] if statements else "")


def dq(text: str) -> str:
    """Double-quotes a constant for the remote shell; it must hold nothing the shell
    would expand inside double quotes (`$`, backquote, `"`, a backslash escape)."""
    if re.search(r'[$`"]|\\[$`"\\\n]', text):
        raise ValueError(f"not a plain constant: {text!r}")
    return f'"{text}"'


def setup_script(jax_version: str, python: str) -> str:
    """Creates the venv and installs jax[tpu] and requirements.txt, once per key.

    TPU images ship Python 3.10 while jax>=0.7 needs 3.11+, so `uv` provides the
    interpreter. The marker holds the Python, jax and requirements.txt hash: rerunning is
    a no-op until one of them changes.
    """
    if not (VERSION.fullmatch(jax_version) and VERSION.fullmatch(python)):
        raise LaunchError(f"bad version: jax {jax_version!r}, python {python!r}", 2)
    jax = f"jax[tpu]=={jax_version}"
    digest = f"$(sha256sum < {REMOTE_REQUIREMENTS} | cut -c1-16)"
    key = f'"python={python} {jax} requirements={digest}"'
    return script(
        "set -e",
        'export PATH="$HOME/.local/bin:$PATH"',
        f"key={key}",
        f'if [ "$(cat {SETUP_MARKER} 2>/dev/null)" = "$key" ]; then'
        ' echo "setup: up to date ($key)"; exit 0; fi',
        "command -v uv >/dev/null || python3 -m pip install --user --quiet uv"
        " || curl -LsSf https://astral.sh/uv/install.sh | sh",
        f"rm -rf {VENV_DIR}",
        f"uv venv --quiet --python {python} {VENV_DIR}",
        f"uv pip install --quiet --python {VENV_DIR}/bin/python {dq(jax)}"
        f" -r {REMOTE_REQUIREMENTS}",
        f'echo "$key" > {SETUP_MARKER}',
        'echo "setup: done on $(hostname) ($key)"')


def unpack_script() -> str:
    """Replaces the code directory with the shipped archive (no stale files survive)."""
    return script("set -e", f"rm -rf {CODE_DIR}", f"mkdir -p {CODE_DIR}",
                  f"tar -xzf {REMOTE_ARCHIVE} -C {CODE_DIR}")


def checkout_script(repo_url: str, ref: str) -> str:
    """Clones `repo_url` once, then fetches and checks out `ref` (branch, tag or commit)."""
    url, ref = shlex.quote(repo_url), shlex.quote(ref)
    return script(
        "set -e",
        f"if [ ! -d {CODE_DIR}/.git ]; then rm -rf {CODE_DIR};"
        f" git clone --quiet {url} {CODE_DIR}; fi",
        f"cd {CODE_DIR}",
        f"git remote set-url origin {url}",
        "git fetch --quiet --tags --force origin",
        f"git checkout --quiet --force --detach origin/{ref} 2>/dev/null"
        f" || git checkout --quiet --force --detach {ref}",
        'echo "checked out $(git rev-parse --short HEAD) on $(hostname)"')


def kill_stale_script(grace_s: int = 60) -> str:
    """Frees the TPU: SIGTERM (a live run checkpoints), then SIGKILL, lockfile, holders.

    Runs in its own ssh call, apart from `start_script`, whose text holds the command
    line that the pattern matches.
    """
    p = dq(PROCESS_PATTERN)
    return script(
        f"pkill -TERM -f {p}",
        f"for i in $(seq {grace_s}); do pgrep -f {p} >/dev/null || break; sleep 1; done",
        f"pkill -KILL -f {p}",
        "sudo rm -f /tmp/libtpu_lockfile",
        "sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | xargs -r sudo kill -9",
        "true")


def start_script(argv: Sequence[str]) -> str:
    """Starts `python ARGV` detached; its exit status lands in STATUS_FILE when it ends.

    A background subshell with every stream redirected lets ssh return at once; it
    ignores SIGHUP (what nohup does, inherited by python), so a dropped connection does
    not stop the run; it traps SIGTERM, so on a preemption notice it outlives python and
    records its exit status (42); `set +e` undoes the script's `set -e` there, so a
    failing python still gets its status written. User arguments pass one shell layer:
    shlex.quote each.
    """
    return script(
        "set -e",
        f"mkdir -p {RUN_DIR}",
        f"rm -f {STATUS_FILE}",
        f"cd {CODE_DIR}",
        f'echo "=== launch.tpu start $(date -u +%Y-%m-%dT%H:%M:%SZ)" >> {LOG_FILE}',
        f'( set +e; trap "" HUP; trap true TERM; {VENV_DIR}/bin/python {shlex.join(argv)}'
        f" >> {LOG_FILE} 2>&1; echo $? > {STATUS_FILE}.tmp;"
        f" mv {STATUS_FILE}.tmp {STATUS_FILE} ) > /dev/null 2>&1 < /dev/null &",
        'echo "started on $(hostname)"')


def worker_status_script() -> str:
    """Prints `leapalign-status STATUS HOST LAST_METRICS_LINE` on each worker.

    STATUS is the recorded exit status, else "running" while a training process lives,
    else "vanished" (killed without recording one, e.g. by a worker restart).
    """
    p = dq(PROCESS_PATTERN)
    return script(
        f"s=$(cat {STATUS_FILE} 2>/dev/null)"
        f" || {{ pgrep -f {p} >/dev/null && s=running"
        f" || s=$(cat {STATUS_FILE} 2>/dev/null) || s=vanished; }}",
        f"m=$(tail -n 2000 {LOG_FILE} 2>/dev/null | grep -E {dq(METRICS_REGEX)}"
        " | tail -n 1)",
        f'echo "{STATUS_MARKER} $s $(hostname) $m"')


def failure_tail_script(lines: int) -> str:
    """The log tail of each worker whose run failed (exit status other than 0 and 42)."""
    return script(
        f"s=$(cat {STATUS_FILE} 2>/dev/null)",
        f'case "$s" in ""|0|{PREEMPTED_EXIT_CODE}) ;; *) echo "--- $(hostname): exit'
        f' status $s; last {lines} lines of {LOG_FILE}"; tail -n {lines} {LOG_FILE};; esac')


def logs_script(lines: int, follow: bool) -> str:
    return f"tail -n {lines}{' -F' if follow else ''} {LOG_FILE}"


# ---------------------------------------------------------------------------------------
# Parsing gcloud and worker output.


def parse_vm_info(result: Result) -> VmInfo:
    """`describe --format=json` -> VmInfo; MISSING when gcloud says NOT_FOUND."""
    if result.code != 0:
        state = "MISSING" if NOT_FOUND.search(result.stderr) else "UNKNOWN"
        return VmInfo(state, error=last_line(result.stderr))
    try:
        node = json.loads(result.stdout or "{}")
    except json.JSONDecodeError:
        return VmInfo("UNKNOWN")
    scheduling = node.get("schedulingConfig") or {}
    return VmInfo(state=node.get("state", "UNKNOWN"),
                  accelerator_type=node.get("acceleratorType", ""),
                  version=node.get("runtimeVersion", ""),
                  spot=bool(scheduling.get("spot") or scheduling.get("preemptible")),
                  queued=bool(node.get("queuedResource")))


def parse_worker_statuses(stdout: str) -> list[WorkerStatus]:
    """The `leapalign-status` lines in the output of `worker_status_script` on all workers."""
    rows = []
    for line in stdout.splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) >= 3 and parts[0] == STATUS_MARKER:
            found = re.search(r"\[[0-9]+\] .*", parts[3]) if len(parts) > 3 else None
            rows.append(WorkerStatus(parts[1], parts[2], found.group(0) if found else ""))
    return rows


def judge(statuses: Sequence[str]) -> Outcome | None:
    """Joins the workers' statuses into one outcome; None while the run goes on.

    Any failure wins (a crashed host stalls the others); then a preemption on any worker
    (the others get the same notice); "done" needs exit status 0 on every worker.
    """
    codes = [int(s) for s in statuses if re.fullmatch(r"-?[0-9]+", s)]
    failed = [c for c in codes if c not in (0, PREEMPTED_EXIT_CODE)]
    if failed:
        return Outcome("failed", failed[0])
    if PREEMPTED_EXIT_CODE in codes:
        return Outcome("preempted", PREEMPTED_EXIT_CODE)
    if "vanished" in statuses:
        return Outcome("vanished")
    if statuses and len(codes) == len(statuses):
        return Outcome("done", 0)
    return None


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


# ---------------------------------------------------------------------------------------
# Runners: the only place commands are executed (or printed).


class Runner:
    """Runs commands. Notes go to stderr; `sleep` sleeps."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def run(self, cmd: Sequence[str], *, tag: str = "", capture: bool = False,
            quiet: bool = False) -> Result:
        """Runs `cmd`; stdout is captured with `capture`, else shown; stderr is shown
        (unless `quiet`) and kept for error messages. `tag` names the kind of command
        (for DryRunner's simulated answers)."""
        del tag
        try:
            proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE if capture else None,
                                    stderr=subprocess.PIPE, text=True)
        except FileNotFoundError as e:
            raise LaunchError(f"{cmd[0]} not found: install it (for gcloud: the Google Cloud"
                              " SDK, then `gcloud auth login`)", 2) from e
        errors: list[str] = []

        def pump() -> None:
            for line in proc.stderr:
                errors.append(line)
                if not quiet:
                    self.err.write(line)
                    self.err.flush()

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        stdout = proc.stdout.read() if capture else ""
        code = proc.wait()
        thread.join()
        return Result(code, stdout, "".join(errors))

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def local(self, what: str, action: Callable[[], object]) -> None:
        """A local step done in Python (no command to print)."""
        self.note(what)
        action()

    def note(self, message: str) -> None:
        print(f"launch.tpu: {message}", file=self.err, flush=True)

    def show(self, text: str) -> None:
        """Output meant for the user (status, log tails)."""
        if text:
            print(text.rstrip("\n"), file=self.out, flush=True)


SIM_HOST = "t1v-n-sim-w-0"
SIM_METRICS = "I0101 00:00:00.000000 1 logging_writer.py:48] [100] loss=0.5, reward=1.25"


class DryRunner(Runner):
    """Prints each command (one line, `shlex.join`) and answers as a simulated VM would.

    `outcomes` is what the successive status polls find, in order: an exit status
    ("0", "42", "1", ...), "running", "vanished", "lost" (the VM is preempted; ssh fails),
    "ssh-error" (ssh fails, the VM stays READY); a "capacity" entry is consumed by the
    next create, which then fails for lack of capacity. When they run out, a poll finds
    `default_status`. Sleeps and notes are printed as `sleep N` and `# note` lines.
    """

    def __init__(self, outcomes: Sequence[str] = (), out: TextIO | None = None,
                 err: TextIO | None = None, node: dict | None = None,
                 default_status: str = "0"):
        super().__init__(out, err)
        self.outcomes = list(outcomes)
        self.node = dict(node or {})
        self.state = self.node.pop("state", "READY")
        self.default_status = default_status

    def run(self, cmd: Sequence[str], *, tag: str = "", capture: bool = False,
            quiet: bool = False) -> Result:
        print(shlex.join(cmd), file=self.out)
        return self.answer(tag)

    def answer(self, tag: str) -> Result:
        if tag == "describe":
            if self.state == "MISSING":
                return Result(1, "", "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND")
            return Result(0, json.dumps({"state": self.state, **self.node}))
        if tag == "create":
            if self.outcomes[:1] == ["capacity"]:
                self.outcomes.pop(0)
                return Result(1, "", "ERROR: (gcloud.compute.tpus.tpu-vm.create) "
                              "RESOURCE_EXHAUSTED: There is no more capacity in the zone")
            self.state = "READY"
        elif tag == "delete":
            self.state = "MISSING"
        elif tag == "queued-state":
            return Result(0, "ACTIVE\n")
        elif tag in ("poll", "status"):
            token = self.outcomes.pop(0) if self.outcomes else self.default_status
            if token in ("lost", "ssh-error"):
                if token == "lost":
                    self.state = "PREEMPTED"
                return Result(255, "", "ssh: connect to host 10.0.0.2 port 22: timed out")
            return Result(0, f"{STATUS_MARKER} {token} {SIM_HOST} {SIM_METRICS}\n")
        elif tag == "tail":
            return Result(0, f"--- {SIM_HOST}: (simulated log tail of the failed worker)\n")
        return Result(0)

    def sleep(self, seconds: float) -> None:
        print(f"sleep {seconds:g}", file=self.out)

    def local(self, what: str, action: Callable[[], object]) -> None:
        self.note(what)

    def note(self, message: str) -> None:
        print(f"# {message}", file=self.out)


def must(result: Result, what: str) -> Result:
    """Raises a one-line LaunchError when a command failed."""
    if result.code != 0:
        raise LaunchError(f"{what} failed (exit status {result.code}): "
                          f"{last_line(result.stderr)}")
    return result


# ---------------------------------------------------------------------------------------
# Steps, each a function of (runner, vm, ...) so tests drive them with a DryRunner.


@dataclasses.dataclass(frozen=True)
class Options:
    """Retry and wait knobs shared by create and run."""

    create_tries: int = 5
    create_backoff_s: float = 60
    poll_interval_s: float = 60
    wait_timeout_s: float = 6 * 3600
    max_poll_failures: int = 10


def describe(runner: Runner, vm: Vm) -> VmInfo:
    return parse_vm_info(runner.run(describe_command(vm), tag="describe", capture=True,
                                    quiet=True))


def create_vm(runner: Runner, vm: Vm, machine: Machine, opts: Options) -> None:
    """Creates the VM, retrying with exponential backoff while the zone lacks capacity."""
    if not machine.accelerator_type:
        raise LaunchError("--accelerator-type is needed to create a TPU VM (e.g. v5p-16)", 2)
    what = f"{machine.accelerator_type} in {vm.zone}"
    for attempt in range(1, opts.create_tries + 1):
        result = runner.run(create_command(vm, machine), tag="create")
        if result.code == 0:
            break
        if ALREADY_EXISTS.search(result.stderr):
            runner.note(f"{vm.name} already exists; using it")
            break
        if not CAPACITY_ERROR.search(result.stderr):
            must(result, f"creating {vm.name} ({what})")
        if attempt == opts.create_tries:
            raise LaunchError(f"no capacity for {what} after {attempt} tries: "
                              f"{last_line(result.stderr)}")
        delay = min(opts.create_backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
        runner.note(f"no capacity for {what} (try {attempt} of {opts.create_tries}); "
                    f"retrying in {delay:g}s")
        runner.sleep(delay)
    if machine.queued:
        wait_queued(runner, vm, opts)


def wait_queued(runner: Runner, vm: Vm, opts: Options) -> None:
    """Waits until the queued resource is ACTIVE (its node then exists)."""
    waited = 0.0
    while True:
        result = runner.run(queued_state_command(vm), tag="queued-state", capture=True,
                            quiet=True)
        state = result.stdout.strip() or "UNKNOWN"
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise LaunchError(f"queued resource {vm.name} is {state}; see `gcloud compute tpus"
                              f" queued-resources describe {vm.name} --zone={vm.zone}`")
        if waited >= opts.wait_timeout_s:
            raise LaunchError(f"queued resource {vm.name} still {state} after {waited:g}s")
        runner.note(f"queued resource {vm.name} is {state}; waiting")
        runner.sleep(opts.poll_interval_s)
        waited += opts.poll_interval_s


def delete_vm(runner: Runner, vm: Vm, queued: bool) -> Result:
    return runner.run(delete_command(vm, queued), tag="delete")


def ensure_ready(runner: Runner, vm: Vm, machine: Machine, opts: Options, *,
                 recreate: bool, info: VmInfo | None = None) -> tuple[VmInfo, bool]:
    """Waits until the VM is READY, (re)creating it when missing or lost if `recreate`.

    Returns its info and whether it was (re)created (a new VM needs setup and code).
    """
    created, waited = 0, 0.0
    while True:
        info = info or describe(runner, vm)
        if info.state == "READY":
            return info, created > 0
        if info.lost:
            if not recreate:
                raise LaunchError(f"TPU VM {vm.name} is {info.state} in {vm.zone}; create it"
                                  " with `python -m launch.tpu create ...`", 2)
            if not machine.accelerator_type:
                raise LaunchError(f"TPU VM {vm.name} is {info.state} in {vm.zone}; pass "
                                  "--accelerator-type (and --spot/--queued) so that run can "
                                  "create it", 2)
            if created >= opts.create_tries:
                raise LaunchError(f"TPU VM {vm.name} was lost again after {created} "
                                  "recreations")
            runner.note(f"TPU VM {vm.name} is {info.state}: creating it")
            if info.state != "MISSING" or machine.queued:
                delete_vm(runner, vm, machine.queued)
            create_vm(runner, vm, machine, opts)
            created += 1
        elif info.state in STUCK_STATES:
            raise LaunchError(f"TPU VM {vm.name} is {info.state}; start or delete it")
        else:
            if waited >= opts.wait_timeout_s:
                raise LaunchError(f"TPU VM {vm.name} still {info.state} after {waited:g}s")
            runner.note(f"TPU VM {vm.name} is {info.state}; waiting")
            runner.sleep(opts.poll_interval_s)
            waited += opts.poll_interval_s
        info = None


SSH_CONNECTION_FAILED = 255  # ssh's own exit status; others come from the remote script


def remote(runner: Runner, steps: Sequence[tuple[list[str], str]], what: str,
           tries: int = 3, retry_s: float = 30) -> None:
    """Runs `steps` (command, tag) in order; on a failed connection (ssh exit 255, any
    scp failure) waits and reruns them all, up to `tries` times; a fresh VM often refuses
    the first connections while its keys propagate. Every step must be idempotent."""
    for attempt in range(1, tries + 1):
        for cmd, tag in steps:
            result = runner.run(cmd, tag=tag)
            if result.code != 0:
                break
        else:
            return
        connection = tag == "scp" or result.code == SSH_CONNECTION_FAILED
        if not connection or attempt == tries:
            must(result, what)
        runner.note(f"{what}: connection failed (try {attempt} of {tries}); retrying in "
                    f"{retry_s:g}s")
        runner.sleep(retry_s)


def setup(runner: Runner, vm: Vm, jax_version: str, python: str,
          retry_s: float = 30) -> None:
    """Ships requirements.txt and installs the environment on every worker (idempotent)."""
    requirements = os.path.relpath(os.path.join(ROOT, "requirements.txt"))
    remote(runner, [(scp_command(vm, requirements, REMOTE_REQUIREMENTS), "scp"),
                    (ssh_command(vm, setup_script(jax_version, python)), "setup")],
           "setup on the workers", retry_s=retry_s)


def local_archive(vm: Vm) -> str:
    return f"/tmp/leapalign_jax-{vm.name}.tgz"


def ship(runner: Runner, vm: Vm, git_ref: str | None, repo_url: str | None,
         retry_s: float = 30) -> None:
    """Puts the code on every worker: the packed working tree, or `git_ref` of `repo_url`."""
    if git_ref:
        steps = [(ssh_command(vm, checkout_script(repo_url, git_ref)), "ship")]
    else:
        steps = [(scp_command(vm, local_archive(vm), REMOTE_ARCHIVE), "scp"),
                 (ssh_command(vm, unpack_script()), "ship")]
    remote(runner, steps, "putting the code on the workers", retry_s=retry_s)


def start(runner: Runner, vm: Vm, argv: Sequence[str], retry_s: float = 30) -> None:
    """Frees the TPU of stale processes, then starts the run detached on every worker.

    Retried as a pair, so a start that reached only some workers is stopped first."""
    remote(runner, [(ssh_command(vm, kill_stale_script()), "kill"),
                    (ssh_command(vm, start_script(argv)), "start")],
           "starting the run", retry_s=retry_s)


def monitor(runner: Runner, vm: Vm, opts: Options) -> Outcome:
    """Polls the workers' status files until the run ends or the VM is lost."""
    failures, shown = 0, ""
    while True:
        runner.sleep(opts.poll_interval_s)
        result = runner.run(ssh_command(vm, worker_status_script()), tag="poll",
                            capture=True, quiet=True)
        rows = parse_worker_statuses(result.stdout) if result.code == 0 else []
        if rows:
            failures = 0
            outcome = judge([row.status for row in rows])
            if outcome is not None:
                runner.note(f"workers report {' '.join(r.status for r in rows)}: "
                            f"run {outcome.reason}")
                return outcome
            metrics = next((row.metrics for row in rows if row.metrics), "")
            if metrics != shown:
                runner.note(f"running; {metrics}")
                shown = metrics
            continue
        info = describe(runner, vm)
        if info.lost:
            runner.note(f"TPU VM {vm.name} is {info.state}")
            return Outcome("lost")
        failures += 1
        why = last_line(result.stderr) if result.code else "no status lines"
        if failures >= opts.max_poll_failures:
            raise LaunchError(f"cannot reach {vm.name} (VM state {info.state}) after "
                              f"{failures} polls: {why}")
        runner.note(f"poll failed ({why}); VM state {info.state}; "
                    f"try {failures} of {opts.max_poll_failures}")


def check_workdir(workdir: str, machine: Machine, allow_local: bool,
                  warn: Callable[[str], None]) -> None:
    """A lost VM takes a local workdir with it: refuse that on spot/queued VMs."""
    if workdir.startswith("gs://"):
        return
    message = (f"--workdir {workdir} is not gs://: checkpoints stay on each worker's disk,"
               " and a lost (preempted) VM takes them with it, so the rerun starts over")
    if (machine.spot or machine.queued) and not allow_local:
        raise LaunchError(f"{message}; on a spot/queued VM use a gs:// workdir (or pass "
                          "--allow-local-workdir)", 2)
    warn(message)


def run_until_done(runner: Runner, vm: Vm, machine: Machine, opts: Options, *,
                   argv: Sequence[str], workdir: str, max_retries: int,
                   allow_local_workdir: bool = False, jax_version: str = "",
                   python: str = "", no_setup: bool = False, git_ref: str | None = None,
                   repo_url: str | None = None, tail_lines: int = 50, attach: bool = False,
                   warn: Callable[[str], None] | None = None) -> int:
    """Starts the run and reruns it after preemption or a lost VM, until it ends.

    With `attach` the first attempt is the run already going on the VM (watch it again
    after the local machine lost its connection). Returns 0 when every worker exits 0;
    raises LaunchError when it fails with another exit status (after printing the
    failing workers' log tails) or after `max_retries` reruns.
    """
    warn = warn or (lambda m: print(f"warning: {m}", file=runner.err, flush=True))
    info = describe(runner, vm)
    if info.state == "UNKNOWN":
        raise LaunchError(f"cannot describe TPU VM {vm.name}: {info.error}")
    machine = Machine(machine.accelerator_type or info.accelerator_type or None,
                      machine.version or info.version or None,
                      machine.spot or info.spot, machine.queued or info.queued)
    check_workdir(workdir, machine, allow_local_workdir, warn)
    if not git_ref:
        archive = local_archive(vm)
        runner.local(f"pack the working tree (git ls-files --cached --others "
                     f"--exclude-standard) into {archive}", lambda: pack_tree(ROOT, archive))
    reruns, fresh = 0, True
    while True:
        info, created = ensure_ready(runner, vm, machine, opts, recreate=True, info=info)
        watch_only = fresh and attach and not created
        if (fresh and not attach) or created:
            if not no_setup:
                setup(runner, vm, jax_version, python, opts.poll_interval_s)
            ship(runner, vm, git_ref, repo_url, opts.poll_interval_s)
        if not watch_only:
            start(runner, vm, argv, opts.poll_interval_s)
        fresh, attach, info = False, False, None
        outcome = monitor(runner, vm, opts)
        if outcome.kind == "done":
            runner.note("done: every worker exited 0")
            return 0
        if outcome.kind == "failed":
            runner.show(runner.run(ssh_command(vm, failure_tail_script(tail_lines)),
                                   tag="tail", capture=True, quiet=True).stdout)
            raise LaunchError(f"the run on {vm.name} failed with exit status {outcome.code}"
                              " (log tail above); fix it and rerun the same command to "
                              "resume from the workdir")
        if reruns >= max_retries:
            raise LaunchError(f"gave up after {reruns} reruns (--max-retries {max_retries}):"
                              f" the run was {outcome.reason} again")
        reruns += 1
        runner.note(f"run {outcome.reason}: rerun {reruns} of {max_retries}")


# ---------------------------------------------------------------------------------------
# Command line.


def _installed_jax() -> str | None:
    try:
        return importlib.metadata.version("jax")
    except importlib.metadata.PackageNotFoundError:
        return None


def _version(value: str) -> str:
    if not VERSION.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a version like 0.10.2 or 3.11")
    return value


def _tpu_name(value: str) -> str:
    if not TPU_NAME.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: lowercase letters, digits and '-', starting with a letter")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, type=_tpu_name, help="TPU VM name")
    common.add_argument("--zone", required=True, help="zone, e.g. us-east5-a")
    common.add_argument("--project", help="GCP project (default: gcloud's)")
    common.add_argument("--dry-run", action="store_true",
                        help="print every command instead of running it")
    common.add_argument("--simulate", default="", help=argparse.SUPPRESS)

    machine = argparse.ArgumentParser(add_help=False)
    machine.add_argument("--accelerator-type", help="e.g. v5p-16, v6e-8, v5litepod-8")
    machine.add_argument("--version", help="runtime image (default: per generation, e.g. "
                         "v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)")
    machine.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    machine.add_argument("--queued", action="store_true",
                         help="create through a queued resource (waits for capacity)")
    machine.add_argument("--create-tries", type=int, default=5,
                         help="tries of create on capacity errors (default: %(default)s)")
    machine.add_argument("--create-backoff", type=float, default=60,
                         help="seconds before the 2nd try, doubled each try up to 900 "
                         "(default: %(default)s)")
    machine.add_argument("--poll-interval", type=float, default=60,
                         help="seconds between state and status polls (default: %(default)s)")
    machine.add_argument("--wait-timeout", type=float, default=6 * 3600,
                         help="seconds to wait for a VM/queued resource to be ready "
                         "(default: %(default)s)")

    env = argparse.ArgumentParser(add_help=False)
    env.add_argument("--jax-version", default=_installed_jax(), type=_version,
                     help="jax[tpu] version to install (default: the local jax, %(default)s)")
    env.add_argument("--python", default="{}.{}".format(*sys.version_info[:2]), type=_version,
                     help="Python version of the venv (default: the local one, %(default)s)")

    parser = argparse.ArgumentParser(
        prog="python -m launch.tpu", allow_abbrev=False,
        description="Create Cloud TPU VMs and run leapalign_jax on them, rerunning after "
                    "preemption. Every subcommand takes --dry-run.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("create", parents=[common, machine], allow_abbrev=False,
                   help="create a TPU VM (or a queued resource), retrying on no capacity")
    sub.add_parser("setup", parents=[common, env], allow_abbrev=False,
                   help="install the venv, jax[tpu] and requirements.txt on all workers")
    run = sub.add_parser(
        "run", parents=[common, machine, env], allow_abbrev=False,
        help="ship the code, start the run detached and rerun it until it finishes",
        epilog="Config overrides follow as --config.KEY=VALUE, or anything after `--`.")
    run.add_argument("--config", required=True, help="configs/ file, e.g. "
                     "configs/toy_leapalign.py or configs/toy_leapalign.py:tiny")
    run.add_argument("--workdir", required=True,
                     help="checkpoints and metrics; gs:// so a lost VM keeps them")
    run.add_argument("--git-ref", help="have workers check out this ref of --repo "
                     "instead of receiving the local working tree")
    run.add_argument("--repo", help="git URL the workers clone for --git-ref")
    run.add_argument("--max-retries", type=int, default=10,
                     help="reruns after preemption or a lost VM before giving up "
                     "(default: %(default)s)")
    run.add_argument("--max-poll-failures", type=int, default=10,
                     help="consecutive failed status polls (VM up) before giving up "
                     "(default: %(default)s)")
    run.add_argument("--allow-local-workdir", action="store_true",
                     help="accept a non-gs:// workdir on a spot/queued VM")
    run.add_argument("--no-setup", action="store_true", help="skip `setup` on (re)start")
    run.add_argument("--attach", action="store_true",
                     help="watch the run already going on the VM (same flags as the run "
                          "that started it) and rerun it as needed")
    run.add_argument("--tail-lines", type=int, default=50,
                     help="log lines shown when the run fails (default: %(default)s)")
    logs = sub.add_parser("logs", parents=[common], allow_abbrev=False,
                          help="tail (or follow) a worker's log")
    logs.add_argument("--worker", default="0", help="worker index, or all")
    logs.add_argument("--lines", type=int, default=100, help="(default: %(default)s)")
    logs.add_argument("--follow", "-f", action="store_true")
    sub.add_parser("status", parents=[common], allow_abbrev=False,
                   help="VM state, whether the run is alive, its last metrics line")
    delete = sub.add_parser("delete", parents=[common], allow_abbrev=False,
                            help="delete the VM (and its queued resource)")
    delete.add_argument("--queued", action="store_true",
                        help="delete the queued resource (found from the VM when it exists)")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses flags; `run` also takes `--config.KEY=VALUE` overrides and anything after `--`."""
    argv = list(argv)
    tail = []
    if "--" in argv:
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not (a.startswith("--config.") and "=" in a)]
    if bad or ((extra or tail) and args.command != "run"):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra or tail)} (config "
                     "overrides go to `run`, as --config.KEY=VALUE or after --)")
    args.overrides = extra + tail
    if args.simulate and not args.dry_run:
        parser.error("--simulate needs --dry-run")
    if args.command == "run":
        if args.git_ref and not args.repo:
            parser.error("--git-ref needs --repo URL (the workers clone it)")
        if not args.jax_version and not args.no_setup:
            parser.error("jax is not installed here: pass --jax-version")
    if args.command == "setup" and not args.jax_version:
        parser.error("jax is not installed here: pass --jax-version")
    return args


def _options(args: argparse.Namespace) -> Options:
    return Options(create_tries=args.create_tries, create_backoff_s=args.create_backoff,
                   poll_interval_s=args.poll_interval, wait_timeout_s=args.wait_timeout,
                   max_poll_failures=getattr(args, "max_poll_failures", 10))


def _machine(args: argparse.Namespace) -> Machine:
    return Machine(args.accelerator_type, args.version, args.spot, args.queued)


def cmd_create(args: argparse.Namespace, runner: Runner, vm: Vm) -> int:
    machine = _machine(args)
    create_vm(runner, vm, machine, _options(args))
    ensure_ready(runner, vm, machine, _options(args), recreate=False)
    runner.note(f"{vm.name} is READY")
    return 0


def cmd_setup(args: argparse.Namespace, runner: Runner, vm: Vm) -> int:
    setup(runner, vm, args.jax_version, args.python)
    return 0


def cmd_run(args: argparse.Namespace, runner: Runner, vm: Vm) -> int:
    return run_until_done(
        runner, vm, _machine(args), _options(args),
        argv=train_argv(args.config, args.workdir, args.overrides), workdir=args.workdir,
        max_retries=args.max_retries, allow_local_workdir=args.allow_local_workdir,
        jax_version=args.jax_version or "", python=args.python, no_setup=args.no_setup,
        git_ref=args.git_ref, repo_url=args.repo, tail_lines=args.tail_lines,
        attach=args.attach)


def cmd_logs(args: argparse.Namespace, runner: Runner, vm: Vm) -> int:
    result = runner.run(ssh_command(vm, logs_script(args.lines, args.follow), args.worker),
                        tag="logs")
    return 0 if result.code in (0, 130) else result.code


def cmd_status(args: argparse.Namespace, runner: Runner, vm: Vm) -> int:
    info = describe(runner, vm)
    if info.state == "UNKNOWN":
        raise LaunchError(f"cannot describe TPU VM {vm.name}: {info.error}")
    kind = ", ".join(filter(None, [info.accelerator_type, "spot" if info.spot else "",
                                   "queued" if info.queued else ""]))
    runner.show(f"{vm.name} ({vm.zone}): {info.state}" + (f", {kind}" if kind else ""))
    if info.state != "READY":
        return 0 if info.state != "MISSING" else 1
    result = runner.run(ssh_command(vm, worker_status_script()), tag="status", capture=True,
                        quiet=True)
    rows = parse_worker_statuses(result.stdout)
    if not rows:
        raise LaunchError(f"no status from the workers: {last_line(result.stderr)}")
    words = {"0": "finished (exit 0)", str(PREEMPTED_EXIT_CODE): "preempted (exit 42)",
             "running": "running", "vanished": "not running"}
    for row in rows:
        state = words.get(row.status, f"failed (exit {row.status})")
        runner.show(f"  {row.host}: {state}" + (f"; last metrics: {row.metrics}"
                                                 if row.metrics else ""))
    return 0


def cmd_delete(args: argparse.Namespace, runner: Runner, vm: Vm) -> int:
    info = describe(runner, vm)
    queued = args.queued or info.queued
    if info.state == "MISSING" and not queued:
        runner.note(f"{vm.name} does not exist in {vm.zone}")
        return 0
    must(delete_vm(runner, vm, queued), f"deleting {vm.name}")
    return 0


COMMANDS = {"create": cmd_create, "setup": cmd_setup, "run": cmd_run, "logs": cmd_logs,
            "status": cmd_status, "delete": cmd_delete}


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> int:
    """Runs one subcommand; returns its exit status (0 ok, 1 failed, 2 usage)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if runner is None:
        outcomes = [t.strip() for t in args.simulate.split(",") if t.strip()]
        runner = (DryRunner(outcomes, default_status="running" if args.command == "status"
                            else "0") if args.dry_run else Runner())
    vm = Vm(args.name, args.zone, args.project)
    try:
        return COMMANDS[args.command](args, runner, vm)
    except LaunchError as e:
        print(f"error: {' '.join(str(e).split())}", file=runner.err, flush=True)
        return e.code
    except KeyboardInterrupt:
        if args.command == "run":
            print(f"\nstopped watching; the run goes on on the VM (see `python -m launch.tpu"
                  f" status --name {vm.name} --zone {vm.zone}`)", file=runner.err)
        return 130


if __name__ == "__main__":
    sys.exit(main())
