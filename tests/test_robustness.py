"""Training that survives preemption, hard kills, bad numbers and bad input.

Signals go to a real `python -m leapalign_jax.main` subprocess on the tiny random Flux.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from leapalign_jax import config_lib, tasks, train
from leapalign_jax.world import build_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "random_flux.py")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def command(workdir, *overrides):
    return [sys.executable, "-m", "leapalign_jax.main", "--config", CONFIG,
            "--workdir", str(workdir), "--config.train.image_every=0", *overrides]


def run(workdir, *overrides):
    return subprocess.run(command(workdir, *overrides), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def checkpoint_steps(workdir):
    path = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def start_and_signal(workdir, sig, ready, *overrides):
    """Starts a run, sends `sig` once `ready(stderr_so_far)` holds; returns (code, stderr)."""
    proc = subprocess.Popen(command(workdir, *overrides), cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))
    reader.start()
    deadline = time.time() + 300
    while proc.poll() is None and not ready("".join(lines)) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "".join(lines)[-3000:]
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    reader.join()
    return code, "".join(lines)


def final_params(workdir):
    config = config_lib.load_config(CONFIG)
    world = build_world(config)
    params, step = tasks.latest_params(config, str(workdir), world, field="params")
    return jax.device_get(params), step


def test_sigterm_checkpoints_exits_42_and_resumes(tmp_path):
    workdir = tmp_path / "run"
    log = workdir / "log.txt"  # library logging (clu's metric lines) goes to the log file
    code, err = start_and_signal(
        workdir, signal.SIGTERM, lambda e: log.exists() and "step_time_s" in log.read_text(),
        "--config.train.steps=100000", "--config.train.log_every=1",
        "--config.train.checkpoint_every=100000")
    assert code == train.PREEMPTED_EXIT_CODE, err[-3000:]
    steps = checkpoint_steps(workdir)
    assert len(steps) == 1 and 1 <= steps[0] < 100000, steps
    stopped = steps[0]

    again = run(workdir, f"--config.train.steps={stopped + 2}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"restored step {stopped}" in again.stderr
    assert checkpoint_steps(workdir)[-1] == stopped + 2


def test_sigkill_anywhere_then_resume_equals_uninterrupted(tmp_path):
    steps = ["--config.train.steps=8", "--config.train.checkpoint_every=1"]
    straight = run(tmp_path / "straight", *steps)
    assert straight.returncode == 0, straight.stderr[-3000:]

    # Kill as soon as a checkpoint has appeared: with one written every step, the kill
    # lands mid-step or mid-write.
    code, _ = start_and_signal(tmp_path / "killed", signal.SIGKILL,
                               lambda e: len(checkpoint_steps(tmp_path / "killed")) >= 2,
                               *steps)
    assert code == -signal.SIGKILL
    assert checkpoint_steps(tmp_path / "killed")[-1] < 8
    resumed = run(tmp_path / "killed", *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, step_a = final_params(tmp_path / "straight")
    b, step_b = final_params(tmp_path / "killed")
    assert step_a == step_b == 8
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)

    # A damaged newest checkpoint is skipped with a warning; the one before it is used,
    # and redoing the last step reproduces it bitwise.
    state_dir = tmp_path / "killed" / "checkpoints" / "8" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(os.path.getsize(f.name) // 3)
    again = run(tmp_path / "killed", *steps)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "unreadable" in again.stderr and "restored step 7" in again.stderr
    c, _ = final_params(tmp_path / "killed")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)):
        np.testing.assert_array_equal(x, y)


def test_nonfinite_run_stops_with_last_good_checkpoint_intact(tmp_path):
    config = config_lib.load_config(CONFIG)
    config.train.update(steps=2, checkpoint_every=2, image_every=0, log_every=1)
    world = build_world(config)
    good = train.train_and_evaluate(config, str(tmp_path), world)

    nan_pipe = dataclasses.replace(world.pipe, reward=lambda f, im, b: jnp.nan * im.sum((1, 2, 3)))
    # log_every above the limit: the limit is checked every step, not only when logging.
    config.train.update(steps=50, checkpoint_every=3, max_nonfinite_steps=4, log_every=10)
    with pytest.raises(train.TrainingError, match="4 consecutive steps"):
        train.train_and_evaluate(config, str(tmp_path), dataclasses.replace(world, pipe=nan_pipe))
    params, step = tasks.latest_params(config, str(tmp_path), world, field="params")
    assert step <= 6  # stopped after 4 bad steps, not after 50
    for x, y in zip(jax.tree.leaves(good.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for word in words:
        assert word in last, (word, last)


def snapshot(path):
    """mtime of every file but the logs (a refused run still logs why)."""
    return {os.path.join(r, f): os.path.getmtime(os.path.join(r, f))
            for r, _, files in os.walk(path) for f in files if not f.startswith("log")}


def test_bad_input_one_line_errors_and_nothing_overwritten(tmp_path):
    from leapalign_jax.models.flux import FluxConfig
    from leapalign_jax.weights.flux import save_flux_bfl

    workdir = tmp_path / "run"
    first = run(workdir, "--config.train.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(workdir)

    # A workdir holding a checkpoint of another model: refused, untouched.
    other = run(workdir, "--config.train.steps=4", "--config.world.model.hidden_size=64",
                "--config.world.model.num_heads=4")
    assert_one_line_error(other, "different run", "start_fresh")
    assert snapshot(workdir) == before

    # Weight files: missing, truncated, of another family, mis-shaped.
    config = config_lib.load_config(CONFIG)
    flux_config = FluxConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in config.world.model.to_dict().items()})
    world = build_world(config)
    good = tmp_path / "flux.safetensors"
    save_flux_bfl(str(good), flux_config, world.params)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    from safetensors.numpy import save_file
    family = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": np.zeros((4, 4, 3, 3), np.float32)}, str(family))
    from safetensors.numpy import load_file
    tensors = load_file(str(good))
    tensors["double_blocks.0.img_attn.proj.weight"] = np.zeros((32, 33), np.float32)
    misshaped = tmp_path / "misshaped.safetensors"
    save_file(tensors, str(misshaped))

    # The command line turns the loader's error into one line (exit 2); the loader's error
    # names each bad file (checked in-process: a CLI start costs ~8 s).
    proc = run(tmp_path / "fresh", f"--config.world.init_weights={truncated}")
    assert_one_line_error(proc, "truncated.safetensors")
    assert not checkpoint_steps(tmp_path / "fresh")
    for path, word in [(tmp_path / "missing.safetensors", "missing.safetensors"),
                       (family, "vae.safetensors"), (misshaped, "misshaped.safetensors")]:
        config.world.init_weights = str(path)
        with pytest.raises((ValueError, FileNotFoundError), match=word) as caught:
            build_world(config)
        assert "\n" not in str(caught.value)

    # The good file loads and trains; start_fresh sets the old checkpoints aside.
    ok = run(workdir, f"--config.world.init_weights={good}", "--config.world.init_axes_dim=(4,6,6)",
             "--config.train.start_fresh=True",
             "--config.train.steps=1")
    assert ok.returncode == 0, ok.stderr[-3000:]
    aside = [d for d in os.listdir(workdir) if d.startswith("checkpoints.old-")]
    assert len(aside) == 1 and os.listdir(workdir / aside[0])


def test_prompt_file_errors(tmp_path):
    from leapalign_jax.toy.world import read_prompt_file

    empty, latin, unknown, good = (tmp_path / n for n in ("empty.txt", "latin.txt",
                                                          "unknown.txt", "good.txt"))
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    latin.write_bytes("a red circle\ncaf\xe9\n".encode("latin-1"))
    unknown.write_text("a red circle\na purple hexagon\n", encoding="utf-8")
    good.write_text("a red circle\n\n# comment\na blue square\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompt_file(str(empty))
    with pytest.raises(ValueError, match="UTF-8"):
        read_prompt_file(str(latin))
    with pytest.raises(ValueError, match="unknown.txt: prompt 2 'a purple hexagon'"):
        read_prompt_file(str(unknown))
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompt_file(str(tmp_path / "missing.txt"))
    assert [p.text for p in read_prompt_file(str(good))] == ["a red circle", "a blue square"]
    # Every format data.read_prompts reads: jsonl and a json list.
    jsonl, listed = tmp_path / "p.jsonl", tmp_path / "p.json"
    jsonl.write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square"}\n',
                     encoding="utf-8")
    listed.write_text('["a blue square"]', encoding="utf-8")
    assert [p.text for p in read_prompt_file(str(jsonl))] == ["a red circle", "a blue square"]
    assert [p.text for p in read_prompt_file(str(listed))] == ["a blue square"]

    proc = subprocess.run(
        [sys.executable, "-m", "leapalign_jax.main", "--config",
         os.path.join(ROOT, "configs", "toy_leapalign.py:tiny"), "--workdir",
         str(tmp_path / "run"), f"--config.world.prompt_file={latin}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert_one_line_error(proc, "not UTF-8")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


# ----------------------------------------------------------------------------- a bucket

# The emulator, plus the x-goog-generation header real GCS sends with object data
# (tensorstore's conditional writes of orbax's OCDBT manifests read it) and the objects.move
# API (`.../o/SRC/moveTo/o/DST`) that gcsfs's renames call first: without it the emulator
# answers 501, which gcsfs retries for ~30 s before falling back to copy and delete.
EMULATOR = """
import sys
from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

def move(request, response, storage, *args, **kwargs):
    request.params["dest_bucket_name"] = request.params["bucket_name"]
    objects.copy(request, response, storage, *args, **kwargs)
    if response.status == 200:
        objects.delete(request, response, storage, *args, **kwargs)

server.HANDLERS = ((
    r"^(?:/storage/v1)?/b/(?P<bucket_name>[-.\\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
    r"(?P<dest_object_id>.*[^/]+)$", {server.POST: move}),) + tuple(server.HANDLERS)

_download = objects.download

def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]
    except Exception:
        pass
    return _download(request, response, storage, *args, **kwargs)

objects.download = download
from gcp_storage_emulator.__main__ import main
sys.argv = ["gcp-storage-emulator", *sys.argv[1:]]
main()
"""


@pytest.fixture
def bucket(tmp_path):
    """A local GCS emulator holding bucket "bkt": (environment for a run, object lister).

    gs:// paths then take the real remote code paths: etils.epath's fsspec backend
    (gcsfs, EPATH_USE_TF=0) for every file of the project, tensorstore's GCS driver for
    orbax's array data, and orbax's bucket rules (no rename; commit marker files).
    """
    pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    import json as json_lib
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", EMULATOR, "start",
                               "--port", str(port), "--default-bucket", "bkt", "--in-memory",
                               "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/bkt", timeout=1)
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "emulator did not start"
            time.sleep(0.2)
    env = dict(ENV, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="test", FSSPEC_GCS_TOKEN="anon",
               EPATH_USE_TF="0", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")

    def objects(prefix=""):
        names, token = [], ""
        while True:
            query = f"prefix={prefix}" + (f"&pageToken={token}" if token else "")
            with urllib.request.urlopen(f"{url}/storage/v1/b/bkt/o?{query}") as r:
                page = json_lib.load(r)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)

    def read(name):
        quoted = urllib.request.quote(name, safe="")
        with urllib.request.urlopen(f"{url}/storage/v1/b/bkt/o/{quoted}?alt=media") as r:
            return r.read()

    def write(name, data):
        request = urllib.request.Request(
            f"{url}/upload/storage/v1/b/bkt/o?uploadType=media&name="
            + urllib.request.quote(name, safe=""), data=data, method="POST")
        urllib.request.urlopen(request).read()

    yield env, objects, read, write
    server.terminate()
    server.wait(timeout=30)


def test_workdir_on_a_bucket(bucket, tmp_path):
    """A whole run with --workdir gs://bkt/run: train, resume past a damaged checkpoint,
    start_fresh; every file lands in the bucket and nothing in a local ./gs: folder."""
    env, objects, read, write = bucket

    def main(*overrides):
        return subprocess.run(
            [sys.executable, "-m", "leapalign_jax.main", "--config", CONFIG,
             "--workdir", "gs://bkt/run",
             "--config.train.log_every=1", "--config.train.checkpoint_every=1",
             # Two checkpoints are all the flow needs; each object the emulator copies on
             # start_fresh costs time.
             "--config.train.keep_checkpoints=2",
             "--config.train.image_every=2", *overrides],
            cwd=tmp_path, env=dict(env, PYTHONPATH=ROOT), capture_output=True, text=True,
            timeout=600)

    first = main("--config.train.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    names = objects("run/")
    for name in ("run/results.md", "run/log.txt", "run/images/000002.png",
                 "run/eval/base/results.json", "run/eval/step_000002/results.json",
                 "run/eval/step_000002/images/00007.png"):
        assert name in names, (name, names)
    assert any(n.startswith("run/checkpoints/2/") for n in names)
    assert "| base |" in read("run/results.md").decode() and "| base |" in first.stdout
    # TensorBoard's own reader on the event file the run wrote into the bucket.
    (event_file,) = [n for n in names if "/events.out.tfevents." in n]
    local = tmp_path.parent / f"{tmp_path.name}-events" / os.path.basename(event_file)
    local.parent.mkdir()
    local.write_bytes(read(event_file))
    events = event_accumulator.EventAccumulator(str(local), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars("steps_per_sec")] == [1, 2]
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert tags["images"] == ["samples"] and "_hparams_/session_start_info" in tags["tensors"]
    assert read("run/images/000002.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert "orbax" in read("run/log.txt").decode()  # library INFO logs go to the log file
    assert "orbax" not in first.stderr  # and not to the console

    # Damage checkpoint 2: the rerun moves it aside (copy + delete on a bucket) and
    # resumes from 1.
    for name in (n for n in objects("run/checkpoints/2/state/") if not n.endswith("/")):
        write(name, b"garbage")
    again = main("--config.train.steps=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "unreadable" in again.stderr and "restored step 1" in again.stderr
    names = objects("run/")
    moved = [n for n in names if n.startswith("run/checkpoints-unreadable/2-")
             and "/state/" in n and not n.endswith("/")]
    assert moved and all(read(n) == b"garbage" for n in moved)  # kept, for inspection
    assert any(n.startswith("run/checkpoints/3/") for n in names)  # 2 and 3 redone

    fresh = main("--config.train.steps=1", "--config.train.start_fresh=True")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    names = objects("run/")
    assert any(n.startswith("run/checkpoints.old-") and "/3/" in n for n in names)
    assert any(n.startswith("run/checkpoints/1/") for n in names)
    assert os.listdir(tmp_path) == []  # nothing written to a local "gs:" folder
