"""The TPU VM launcher (launch/tpu.py) without gcloud or network.

Dry-run output of every subcommand is compared with tests/golden/launch/*.txt
(regenerate with `UPDATE_GOLDENS=1 python -m pytest -q tests/test_launch.py`). The remote
scripts are also executed by a local bash with a stub python, so quoting, detaching and
exit-status recording are checked by a real shell, not only by reading the text.
"""

import importlib.metadata
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from launch import tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(ROOT, "tests", "golden", "launch")
VM = ["--name", "tpu-a", "--zone", "us-east5-a"]
ENV = ["--jax-version", "0.10.2", "--python", "3.11"]
RUN = ["run", *VM, "--config", "configs/toy_leapalign.py", "--workdir", "gs://bucket/run",
       *ENV, "--dry-run"]
# Overrides as the remote python must receive them (the local shell already removed the
# user's quotes): parentheses, spaces, both quotes, `$`, `;` and a glob.
OVERRIDES = ["--config.world.init_axes_dim=(4,6,6)",
             "--config.method.name=two words 'single' \"double\" $HOME; rm -rf *"]

GOLDEN_CASES = {
    "create": (["create", *VM, "--accelerator-type", "v5p-16", "--dry-run"], 0),
    "create_queued_spot": (["create", "--name", "tpu-b", "--zone", "us-east1-d", "--project",
                            "my-proj", "--accelerator-type", "v6e-8", "--spot", "--queued",
                            "--dry-run"], 0),
    "setup": (["setup", *VM, *ENV, "--dry-run"], 0),
    "run": (RUN, 0),
    "run_overrides": (RUN + ["--config.world.init_axes_dim=(4,6,6)", "--",
                             "--config.method.name", "two words"], 0),
    # running -> preempted (42) -> rerun -> VM lost -> recreate (1 capacity error) -> 0.
    "run_preempted_lost": (RUN + ["--spot", "--accelerator-type", "v5p-16",
                                  "--simulate", "running,42,lost,capacity,0"], 0),
    "run_failed": (RUN + ["--simulate", "running,1"], 1),
    "run_max_retries": (RUN + ["--max-retries", "1", "--poll-interval", "5",
                               "--simulate", "42,vanished"], 1),
    "run_git_ref": (RUN + ["--git-ref", "v1.0", "--repo", "https://example.com/leapalign.git",
                           "--no-setup"], 0),
    # Watch a run already going (after the laptop dropped), rerun it after preemption.
    "run_attach": (RUN + ["--attach", "--simulate", "running,42,0"], 0),
    "logs": (["logs", *VM, "--dry-run"], 0),
    "logs_follow": (["logs", *VM, "--worker", "1", "--lines", "20", "--follow", "--dry-run"], 0),
    "status": (["status", *VM, "--dry-run"], 0),
    "delete": (["delete", *VM, "--dry-run"], 0),
    "delete_queued": (["delete", *VM, "--queued", "--project", "my-proj", "--dry-run"], 0),
}


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    """Local paths in the commands are relative to the working directory: the repo root."""
    monkeypatch.chdir(ROOT)


def run_main(capsys, argv, runner=None):
    code = tpu.main(argv, runner)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_dry_run_matches_golden(name, capsys):
    argv, expected_code = GOLDEN_CASES[name]
    code, out, _ = run_main(capsys, argv)
    assert code == expected_code
    path = os.path.join(GOLDEN_DIR, f"{name}.txt")
    if os.environ.get("UPDATE_GOLDENS"):
        os.makedirs(GOLDEN_DIR, exist_ok=True)
        with open(path, "w") as f:
            f.write(out)
    with open(path) as f:
        assert out == f.read(), f"dry-run output changed; UPDATE_GOLDENS=1 rewrites {path}"


def test_every_printed_command_is_one_shell_line(capsys):
    """Each gcloud command is one line that a shell splits back into the same argv."""
    _, out, _ = run_main(capsys, RUN + OVERRIDES + ["--simulate", "42,lost,0",
                                                    "--accelerator-type", "v5p-16"])
    lines = [line for line in out.splitlines() if line.startswith("gcloud ")]
    assert len(lines) > 10
    for line in lines:
        argv = shlex.split(line)
        assert shlex.join(argv) == line
        assert argv[:3] == ["gcloud", "compute", "tpus"] and argv[-1] == "--quiet"


# ---------------------------------------------------------------------------------------
# Quoting: the remote python gets exactly the local argv.


def _shell_tokens(text):
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _remote_python_argv(out):
    """Reads the start command from dry-run output the way ssh and the remote shell do."""
    [line] = [line for line in out.splitlines() if "leapalign_venv/bin/python -m" in line]
    gcloud = shlex.split(line)
    remote = gcloud[gcloud.index("--command") + 1]
    tokens = _shell_tokens(remote)
    start = tokens.index("$HOME/leapalign_venv/bin/python") + 1
    end = next(i for i in range(start, len(tokens)) if tokens[i] in (">>", ";", "&", ")"))
    return tokens[start:end]


def test_overrides_survive_quoting_into_the_remote_shell(capsys):
    code, out, _ = run_main(capsys, RUN + OVERRIDES[:1] + ["--", OVERRIDES[1], "--debug"])
    assert code == 0
    assert _remote_python_argv(out) == tpu.train_argv(
        "configs/toy_leapalign.py", "gs://bucket/run", OVERRIDES + ["--debug"])


def test_config_and_workdir_with_spaces_are_quoted(capsys):
    argv = ["run", *VM, "--config", "configs/my config.py:tiny", "--workdir",
            "gs://bucket/a b", *ENV, "--dry-run"]
    code, out, _ = run_main(capsys, argv)
    assert code == 0
    assert _remote_python_argv(out)[2:6] == ["--config", "configs/my config.py:tiny",
                                             "--workdir", "gs://bucket/a b"]


def test_wrapper_script_passes_arguments_through(tmp_path):
    """launch/tpu_vm.sh works from any directory and keeps each argument whole."""
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "tpu_vm.sh"), *RUN, "--", OVERRIDES[1]],
        cwd=tmp_path, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHON": sys.executable}).stdout
    assert _remote_python_argv(out)[-1] == OVERRIDES[1]
    assert "scp requirements.txt" not in out  # paths relative to the working directory
    assert f"scp {os.path.relpath(ROOT, tmp_path)}/requirements.txt" in out


# ---------------------------------------------------------------------------------------
# The remote scripts, executed by a local bash with HOME in tmp_path and a stub python.

STUB = """#!{python}
import json, os, signal, sys, time
home = os.environ["HOME"]
signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))  # like leapalign_jax.train
with open(home + "/stub.tmp", "w") as f:
    json.dump({{"argv": sys.argv[1:], "pid": os.getpid(), "ppid": os.getppid(),
               "cwd": os.getcwd()}}, f)
os.rename(home + "/stub.tmp", home + "/stub.json")
print("I0101 00:00:00.000000 1 logging_writer.py:48] [7] loss=0.25, reward=2")
sys.stdout.flush()
time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
sys.exit(int(os.environ.get("STUB_EXIT", "0")))
"""


@pytest.fixture
def worker(tmp_path):
    """A fake worker: HOME with the code directory and a venv whose python is a stub."""
    home = tmp_path / "home"
    (home / "leapalign_jax").mkdir(parents=True)
    python = home / "leapalign_venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STUB.format(python=sys.executable))
    python.chmod(0o755)
    return home


def _bash(home, text, **env):
    return subprocess.run(["bash", "-c", text], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "HOME": str(home), **env})


def _wait_for(path, timeout=10.0):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


def _start(home, argv, **env):
    began = time.time()
    result = _bash(home, tpu.start_script(argv), **env)
    assert result.returncode == 0, result.stderr
    assert "started on" in result.stdout
    return time.time() - began


@pytest.mark.parametrize("exit_code", [0, 3, 42])
def test_start_script_records_the_exit_status(worker, exit_code):
    argv = tpu.train_argv("configs/toy_leapalign.py", "gs://b/r", OVERRIDES)
    _start(worker, argv, STUB_EXIT=str(exit_code))
    status = _wait_for(worker / "leapalign_run" / "exit_status")
    assert status.strip() == str(exit_code)  # also for a failing python (set -e undone)
    stub = json.loads((worker / "stub.json").read_text())
    assert stub["argv"] == argv
    assert stub["cwd"] == str(worker / "leapalign_jax")
    rows = tpu.parse_worker_statuses(_bash(worker, tpu.worker_status_script()).stdout)
    assert [r.status for r in rows] == [str(exit_code)]
    assert rows[0].metrics == "[7] loss=0.25, reward=2"
    tail = _bash(worker, tpu.failure_tail_script(5)).stdout
    assert ("[7] loss=0.25" in tail) == (exit_code == 3)  # tails only a failed worker


def test_start_returns_at_once_and_the_run_survives_hangup_and_records_42(worker):
    """The ssh command returns while the run goes on; a dropped connection (SIGHUP) does
    not stop it; a preemption notice (SIGTERM to every process) leaves status 42."""
    elapsed = _start(worker, tpu.train_argv("c.py", "gs://b/r", []), STUB_SLEEP="20")
    assert elapsed < 5
    stub = json.loads(_wait_for(worker / "stub.json"))
    rows = tpu.parse_worker_statuses(_bash(worker, tpu.worker_status_script()).stdout)
    assert [r.status for r in rows] == ["running"]
    for sig in (signal.SIGHUP, signal.SIGTERM):
        for pid in (stub["ppid"], stub["pid"]):
            os.kill(pid, sig)
        time.sleep(0.2)
    status = _wait_for(worker / "leapalign_run" / "exit_status")
    assert status.strip() == "42"


def test_scripts_that_kill_or_count_runs_do_not_match_themselves():
    """pkill/pgrep -f would otherwise hit the ssh shell running the script."""
    pattern = re.compile(tpu.PROCESS_PATTERN)
    for text in (tpu.kill_stale_script(), tpu.worker_status_script(),
                 tpu.failure_tail_script(5), tpu.unpack_script(), tpu.setup_script("1", "3")):
        assert not pattern.search(text)
    # The start script does match: its wrapper shell counts as the run while it lives.
    assert pattern.search(tpu.start_script(tpu.train_argv("c.py", "w", [])))
    kill = tpu.kill_stale_script()
    for step in ("pkill -TERM", "pkill -KILL", "/tmp/libtpu_lockfile", "lsof -t /dev/accel*"):
        assert step in kill


def test_pack_tree_ships_tracked_and_untracked_but_not_ignored_files(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    for name, text in {"a.py": "a", "gone.py": "g", ".gitignore": "runs/\n",
                       "my dir/b c.py": "b"}.items():
        (repo / name).parent.mkdir(exist_ok=True)
        (repo / name).write_text(text)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    (repo / "a.py").write_text("edited")  # uncommitted edits travel
    (repo / "new.py").write_text("n")  # so do new files
    (repo / "runs").mkdir()
    (repo / "runs" / "ckpt").write_text("big")  # ignored outputs do not
    (repo / "gone.py").unlink()  # nor files deleted locally
    archive = tmp_path / "code.tgz"
    tpu.pack_tree(str(repo), str(archive))
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
        assert tar.extractfile("a.py").read() == b"edited"
    assert names == [".gitignore", "a.py", "my dir/b c.py", "new.py"]
    with pytest.raises(tpu.LaunchError, match="use --git-ref REF --repo URL"):
        tpu.tree_files(str(tmp_path / "not-a-repo"))


# ---------------------------------------------------------------------------------------
# The monitor loop, driven by the simulated VM of DryRunner.


def _loop(outcomes, *, node=None, max_retries=3, machine=tpu.Machine("v5p-16"),
          workdir="gs://b/r", **kwargs):
    runner = tpu.DryRunner(outcomes, node=node, out=io.StringIO(), err=io.StringIO())
    error = None
    try:
        code = tpu.run_until_done(
            runner, tpu.Vm("tpu-a", "z"), machine, tpu.Options(poll_interval_s=1),
            argv=tpu.train_argv("c.py", workdir, []), workdir=workdir,
            max_retries=max_retries, jax_version="0.10.2", python="3.11", **kwargs)
    except tpu.LaunchError as e:
        code, error = e.code, str(e)
    text = runner.out.getvalue()
    count = lambda what: sum(what in line for line in text.splitlines())  # noqa: E731
    return code, error, text, count


def test_loop_reruns_the_same_command_after_exit_42():
    code, error, text, count = _loop(["running", "42", "42", "0"])
    assert (code, error) == (0, None)
    starts = [line for line in text.splitlines() if "leapalign_venv/bin/python -m" in line]
    assert len(starts) == 3 and len(set(starts)) == 1  # the same command each time
    assert count("pkill -TERM") == 3
    assert count("tpu-vm create") == 0 and count("tpu-vm delete") == 0
    assert count("uv venv") == 1 and count("tar -xzf") == 1  # setup and code: once
    assert "rerun 2 of 3" in text


def test_loop_recreates_a_lost_vm_then_sets_it_up_again():
    code, error, text, count = _loop(["lost", "0"], machine=tpu.Machine("v5p-16", spot=True))
    assert (code, error) == (0, None)
    lines = text.splitlines()
    delete = next(i for i, line in enumerate(lines) if "tpu-vm delete" in line)
    create = next(i for i, line in enumerate(lines) if "tpu-vm create" in line)
    assert delete < create
    assert "--accelerator-type=v5p-16 --version=v2-alpha-tpuv5 --spot" in lines[create]
    after = "\n".join(lines[create:])
    assert "uv venv" in after and "tar -xzf" in after and "bin/python -m" in after
    assert count("uv venv") == 2 and count("bin/python -m") == 2


def test_loop_recreates_a_vanished_vm_with_settings_read_from_it():
    """A queued spot VM found by describe is recreated the same way, without flags."""
    node = {"state": "READY", "acceleratorType": "v6e-8", "runtimeVersion": "v2-alpha-tpuv6e",
            "schedulingConfig": {"spot": True}, "queuedResource": "projects/p/x/tpu-a"}
    code, error, text, _ = _loop(["lost", "0"], node=node, machine=tpu.Machine())
    assert (code, error) == (0, None)
    assert "queued-resources delete tpu-a --zone=z --force --quiet" in text
    assert ("queued-resources create tpu-a --zone=z --node-id=tpu-a --accelerator-type=v6e-8"
            " --runtime-version=v2-alpha-tpuv6e --spot --quiet") in text


def test_loop_stops_after_max_retries_with_one_line_error(capsys):
    code, out, err = run_main(capsys, RUN + ["--max-retries", "2", "--accelerator-type",
                                             "v5p-16", "--simulate", "42,lost,vanished,0"])
    assert code == 1
    assert err.splitlines() == [
        "error: gave up after 2 reruns (--max-retries 2): the run was stopped without an "
        "exit status (worker restarted?) again"]
    assert out.count("bin/python -m") == 3


def test_loop_stops_at_once_on_another_failure_status(capsys):
    code, out, err = run_main(capsys, RUN + ["--simulate", "running,3,0"])
    assert code == 1
    assert out.count("bin/python -m") == 1  # no rerun
    assert "(simulated log tail" in out  # the failing worker's log tail is shown
    [line] = err.splitlines()
    assert line.startswith("error: the run on tpu-a failed with exit status 3 (log tail")


def test_loop_outlives_transient_ssh_errors_but_not_endless_ones():
    code, error, text, count = _loop(["ssh-error", "ssh-error", "0"])
    assert (code, error) == (0, None)
    assert count("tpu-vm create") == 0 and "try 2 of 10" in text
    code, error, _, _ = _loop(["ssh-error"] * 20)
    assert code == 1 and error.startswith("cannot reach tpu-a (VM state READY) after 10 polls")


class _Flaky(tpu.DryRunner):
    """Fails the first commands of the given tags with the given exit statuses."""

    def __init__(self, failures, outcomes=()):
        super().__init__(outcomes, out=io.StringIO(), err=io.StringIO())
        self.failures = list(failures)

    def answer(self, tag):
        if self.failures and self.failures[0][0] == tag:
            return tpu.Result(self.failures.pop(0)[1], "", "ssh: connection refused")
        return super().answer(tag)


def _run_flaky(failures):
    runner = _Flaky(failures)
    try:
        code = tpu.run_until_done(
            runner, tpu.Vm("tpu-a", "z"), tpu.Machine("v5p-16"), tpu.Options(poll_interval_s=7),
            argv=["x"], workdir="gs://b/r", max_retries=1, jax_version="1", python="3.11")
    except tpu.LaunchError as e:
        return e.code, str(e), runner.out.getvalue()
    return code, None, runner.out.getvalue()


def test_connection_failures_of_a_fresh_vm_are_retried():
    code, error, out = _run_flaky([("scp", 1), ("setup", 255), ("start", 255)])
    assert (code, error) == (0, None)
    assert out.count("uv venv") == 2  # scp failed before setup; setup retried once
    assert out.count("pkill -TERM") == 2  # the kill runs again before the retried start
    assert out.count("bin/python x") == 2
    assert "starting the run: connection failed (try 1 of 3); retrying in 7s" in out
    code, error, out = _run_flaky([("start", 255)] * 3)
    assert code == 1 and error.startswith("starting the run failed (exit status 255)")


def test_a_failing_remote_script_is_not_retried():
    code, error, out = _run_flaky([("setup", 1)])
    assert code == 1 and out.count("uv venv") == 1
    assert error == "setup on the workers failed (exit status 1): ssh: connection refused"


def test_lost_vm_without_accelerator_type_is_a_usage_error():
    code, error, _, _ = _loop(["lost"], machine=tpu.Machine())
    assert code == 2 and "pass --accelerator-type" in error


def test_attach_watches_without_restarting_then_reruns(capsys):
    code, out, _ = run_main(capsys, RUN + ["--attach", "--simulate", "running,42,0"])
    assert code == 0
    first_start = out.index("bin/python -m")
    assert out.index("pkill -TERM") < first_start  # the first start is the rerun...
    assert out.index("workers report 42") < first_start  # ...after the attached run's 42
    assert "uv venv" not in out and "tar -xzf" not in out  # the VM keeps its setup


def test_a_vm_that_cannot_be_described_is_an_error_not_a_wait(capsys):
    runner = tpu.DryRunner()
    runner.answer = lambda tag: tpu.Result(1, "", "ERROR: (gcloud) You do not currently have"
                                           " an active account selected.")
    code, out, err = run_main(capsys, RUN, runner)
    assert code == 1 and "sleep" not in out
    assert err.splitlines() == ["error: cannot describe TPU VM tpu-a: ERROR: (gcloud) You do "
                                "not currently have an active account selected."]


def test_run_creates_a_missing_vm_when_told_how(capsys):
    runner = tpu.DryRunner(node={"state": "MISSING"})
    code, out, _ = run_main(capsys, RUN + ["--accelerator-type", "v5litepod-8"], runner)
    assert code == 0
    assert "tpu-vm delete" not in out  # nothing to delete
    assert "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite --quiet" in out


@pytest.mark.parametrize("flags, node, code", [
    (["--spot"], None, 2),
    (["--queued"], None, 2),
    ([], {"state": "READY", "schedulingConfig": {"preemptible": True}}, 2),
    (["--spot", "--allow-local-workdir"], None, 0),
    ([], None, 0),
])
def test_local_workdir_on_a_preemptible_vm(capsys, flags, node, code):
    """A lost VM loses a local workdir: an error on spot/queued VMs, else a warning."""
    argv = ["run", *VM, "--config", "c.py", "--workdir", "runs/x", *ENV, "--dry-run", *flags]
    got, out, err = run_main(capsys, argv, tpu.DryRunner(node=node))
    assert got == code
    [line] = err.splitlines()
    assert ("error: " if code else "warning: ") + "--workdir runs/x is not gs://" in line
    assert ("bin/python -m" in out) == (code == 0)
    if code:
        assert "gs://" in line and "--allow-local-workdir" in line
        assert "pack the working tree" not in out  # nothing shipped or started


# ---------------------------------------------------------------------------------------
# create retries, parsing and flags.


class _FailingCreate(tpu.DryRunner):
    def __init__(self, errors):
        super().__init__()
        self.errors = list(errors)

    def answer(self, tag):
        if tag == "create" and self.errors:
            return tpu.Result(1, "", self.errors.pop(0))
        return super().answer(tag)


def test_create_retries_capacity_errors_with_backoff(capsys):
    runner = tpu.DryRunner(["capacity", "capacity"])
    tpu.create_vm(runner, tpu.Vm("t", "z"), tpu.Machine("v5p-16"),
                  tpu.Options(create_tries=3, create_backoff_s=10))
    out = capsys.readouterr().out
    assert out.count("tpu-vm create") == 3
    assert [line for line in out.splitlines() if line.startswith("sleep")] == [
        "sleep 10", "sleep 20"]
    with pytest.raises(tpu.LaunchError, match="no capacity for v5p-16 in z after 2 tries"):
        tpu.create_vm(tpu.DryRunner(["capacity"] * 2), tpu.Vm("t", "z"),
                      tpu.Machine("v5p-16"), tpu.Options(create_tries=2))


def test_create_stops_on_other_errors_and_accepts_an_existing_vm(capsys):
    runner = _FailingCreate(["ERROR: PERMISSION_DENIED: tpu.nodes.create"])
    with pytest.raises(tpu.LaunchError, match="PERMISSION_DENIED") as e:
        tpu.create_vm(runner, tpu.Vm("t", "z"), tpu.Machine("v5p-16"), tpu.Options())
    assert capsys.readouterr().out.count("tpu-vm create") == 1 and e.value.code == 1
    runner = _FailingCreate(["ERROR: ALREADY_EXISTS: node t"])
    tpu.create_vm(runner, tpu.Vm("t", "z"), tpu.Machine("v5p-16"), tpu.Options())
    assert "already exists" in capsys.readouterr().out


def test_judge_joins_worker_statuses():
    assert tpu.judge(["running", "running"]) is None
    assert tpu.judge(["0", "running"]) is None
    assert tpu.judge(["0", "0"]) == tpu.Outcome("done", 0)
    assert tpu.judge(["42", "running"]) == tpu.Outcome("preempted", 42)
    assert tpu.judge(["42", "1"]) == tpu.Outcome("failed", 1)
    assert tpu.judge(["0", "vanished"]) == tpu.Outcome("vanished")
    assert tpu.judge([]) is None


def test_parse_worker_statuses_skips_ssh_noise():
    out = ("Using ssh batch size of 1.\nleapalign-status 42 w-1 I0101 x.py:1] [30] loss=1\n"
           "Warning: Permanently added\nleapalign-status running w-0 \n")
    assert tpu.parse_worker_statuses(out) == [tpu.WorkerStatus("42", "w-1", "[30] loss=1"),
                                              tpu.WorkerStatus("running", "w-0", "")]


def test_parse_vm_info():
    assert tpu.parse_vm_info(tpu.Result(1, "", "ERROR: NOT_FOUND: tpu-a")).state == "MISSING"
    assert tpu.parse_vm_info(tpu.Result(1, "", "ERROR: network down")).state == "UNKNOWN"
    info = tpu.parse_vm_info(tpu.Result(0, json.dumps({"state": "PREEMPTED",
                                                       "acceleratorType": "v5p-16"})))
    assert info.lost and info.accelerator_type == "v5p-16" and not info.spot


def test_flags(capsys):
    for argv, message in [
        (["status", *VM, "--config.a=1"], "config overrides go to `run`"),
        (RUN + ["stray"], "unrecognized arguments: stray"),
        (["status", *VM, "--simulate", "0"], "--simulate needs --dry-run"),
        (RUN + ["--git-ref", "main"], "--git-ref needs --repo"),
        (["status", "--name", "Bad_Name", "--zone", "z"], "lowercase letters"),
        (["setup", *VM, "--jax-version", "0.10; rm -rf ~"], "not a version"),
    ]:
        with pytest.raises(SystemExit) as e:
            tpu.parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    args = tpu.parse_args(["setup", *VM])
    assert args.jax_version == importlib.metadata.version("jax")
    assert args.python == "{}.{}".format(*sys.version_info[:2])
    assert tpu.default_version("v6e-8") == "v2-alpha-tpuv6e"
    assert tpu.default_version("v4-32") == "tpu-ubuntu2204-base"
