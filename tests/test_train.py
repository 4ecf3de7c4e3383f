"""The trainer on the tiny random Flux: reward rises, resume is exact, bad config fails."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leapalign_jax import checkpoint, config_lib, sampling, tasks, train
from leapalign_jax.world import build_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(steps=12, method="", **train_overrides):
    variant = f":{method}" if method else ""
    config = config_lib.load_config(os.path.join(ROOT, "configs", f"random_flux.py{variant}"))
    config.train.steps = steps
    config.train.image_every = 0
    config.train.log_every = 4
    config.train.checkpoint_every = 100
    config.train.update(train_overrides)
    return config


def mean_reward(world, params):
    images = sampling.make_sample_fn(world.pipe)(params, world.frozen, world.eval_batch,
                                                 jax.random.key(7))
    return float(jnp.mean(world.pipe.reward(world.frozen, images, world.eval_batch)))


def test_leapalign_raises_the_reward(tmp_path):
    config = tiny_config(steps=12)
    world = build_world(config)
    before = mean_reward(world, world.params)
    state = train.train_and_evaluate(config, str(tmp_path), world)
    after = mean_reward(world, state.params)
    assert int(state.step) == 12
    assert after > before + 0.05, (before, after)
    assert os.path.isdir(tmp_path / "checkpoints" / "12")


def test_resume_is_exact(tmp_path):
    config = tiny_config(steps=6, checkpoint_every=3)
    world = build_world(config)
    straight = train.train_and_evaluate(config, str(tmp_path / "a"), world)

    half = tiny_config(steps=3, checkpoint_every=3)
    train.train_and_evaluate(half, str(tmp_path / "b"), world)
    resumed = train.train_and_evaluate(config, str(tmp_path / "b"), world)

    assert int(resumed.step) == 6
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("knob, value", [("method.alpha", 0.1),
                                         ("optim.learning_rate", 3e-5), ("seed", 1)])
def test_resume_refuses_a_run_with_other_knobs(tmp_path, knob, value):
    config = tiny_config(steps=2, checkpoint_every=2)
    world = build_world(config)
    train.train_and_evaluate(config, str(tmp_path), world)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    other = tiny_config(steps=4, checkpoint_every=2)
    if "." in knob:
        section, name = knob.split(".")
        other[section][name] = value
    else:
        other[knob] = value
    with pytest.raises(checkpoint.CheckpointError, match=knob.replace(".", r"\.")):
        train.train_and_evaluate(other, str(tmp_path), build_world(other))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_weights_file_identity_changes_with_content(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"a" * 100)
    first = checkpoint.file_identity(str(path))
    path.write_bytes(b"b" * 100)
    assert checkpoint.file_identity(str(path)) != first
    folder = tmp_path / "folder" / "transformer"  # a diffusers folder: files at any depth
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    whole = checkpoint.file_identity(str(tmp_path / "folder"))
    (folder / "config.json").write_text("[]")
    assert checkpoint.file_identity(str(tmp_path / "folder")) != whole


def test_inference_restore_reads_ema_params_and_moves_nothing(tmp_path):
    config = tiny_config(steps=3, checkpoint_every=3)
    world = build_world(config)
    state = train.train_and_evaluate(config, str(tmp_path), world)
    snapshot = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f))
                for r, _, files in os.walk(tmp_path / "checkpoints") for f in files}
    config.train.start_fresh = True  # must not matter for inference
    params, step = tasks.latest_params(config, str(tmp_path), world)
    assert step == 3
    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(jax.tree.leaves(state.params)[0]),
                              np.asarray(jax.tree.leaves(params)[0]))
    after = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f))
             for r, _, files in os.walk(tmp_path / "checkpoints") for f in files}
    assert after == snapshot and sorted(os.listdir(tmp_path)) == sorted(
        ["checkpoints"] + [f for f in os.listdir(tmp_path) if f != "checkpoints"])
    assert not any(n.startswith("checkpoints.old") for n in os.listdir(tmp_path))


def test_hooks_run_on_their_steps_with_step_times(tmp_path):
    config = tiny_config(steps=5, checkpoint_every=100)
    calls = []

    def hook(step, state, metrics):
        calls.append((step, int(state.step), metrics["step_time_s"]))
        return {"hook/value": float(step)}

    train.train_and_evaluate(config, str(tmp_path), build_world(config),
                             hooks=[train.Hook(hook, every=2)])
    assert [c[0] for c in calls] == [2, 4, 5] and all(c[0] == c[1] for c in calls)
    assert all(c[2] > 0 for c in calls)


@pytest.mark.parametrize("method", ["refl", "draft", "draft_lv", "drtune", "alignprop",
                                    "grpo"])
def test_every_method_trains_the_tiny_config(tmp_path, method):
    """The shared trainer runs each baseline: finite steps, moved params, a checkpoint."""
    config = tiny_config(steps=2, method=method, checkpoint_every=2)
    world = build_world(config)
    state = train.train_and_evaluate(config, str(tmp_path), world)
    assert config.method.name == method and int(state.step) == 2
    assert int(state.nonfinite_run) == 0
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(world.params), jax.tree.leaves(state.params))]
    assert all(np.isfinite(moved)) and max(moved) > 0.0
    assert os.path.isdir(tmp_path / "checkpoints" / "2")


def test_nonfinite_step_leaves_state_unchanged():
    config = tiny_config()
    world = build_world(config)
    opt = train.make_optimizer(config.optim)
    state = train.create_train_state(world.params, opt, 0)
    batch = world.train_batch(0)
    batch["cond"]["y"] = batch["cond"]["y"] * np.nan
    step = jax.jit(train.make_train_step(world.pipe, config.method, opt, 0.9, 1.0))
    new, metrics = step(state, world.frozen, batch)
    assert float(metrics["nonfinite"]) == 1.0 and int(new.nonfinite_run) == 1
    assert int(new.step) == 1
    for a, b in zip(jax.tree.leaves((state.params, state.ema_params, state.opt_state)),
                    jax.tree.leaves((new.params, new.ema_params, new.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("key, value, match", [
    ("method.alpha", 1.5, "alpha"),
    ("method.tau", 0.0, "tau"),
    ("method.min_idx", 7, "step range"),
    ("train.batch_size", 0, "batch_size"),
])
def test_validate_rejects_bad_knobs(key, value, match):
    config = tiny_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(config, data_parallel=1, num_steps=config.world.num_steps)


def test_validate_rejects_batch_not_divisible_and_unknown_method_key():
    config = tiny_config()
    config.train.batch_size = 6
    with pytest.raises(config_lib.ConfigError, match="divisible"):
        config_lib.validate(config, data_parallel=4, num_steps=8)
    config = tiny_config()
    config.method.unlock()
    config.method.alhpa = 0.3
    with pytest.raises(config_lib.ConfigError, match="alhpa"):
        config_lib.validate(config, data_parallel=1, num_steps=8)


def run_main(*args):
    return subprocess.run([sys.executable, "-m", "leapalign_jax.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_main_trains_then_samples_and_rejects_bad_input(tmp_path):
    workdir = str(tmp_path / "run")
    common = ["--config", "configs/random_flux.py", "--workdir", workdir,
              "--config.train.steps=2", "--config.train.log_every=1"]
    ok = run_main(*common)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
    assert any(f.startswith("events") for f in os.listdir(workdir))
    assert os.path.exists(os.path.join(workdir, "images", "000002.png"))

    sample = run_main(*common, "--config.task=sample")
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert os.path.exists(os.path.join(workdir, "samples", "000002.png"))
    singles = sorted(os.listdir(os.path.join(workdir, "samples", "000002")))
    assert singles and singles[0] == "000.png"

    bad = run_main(*common, "--config.method.alpha=2.0")
    assert bad.returncode != 0
    last = bad.stderr.strip().splitlines()[-1]
    assert "alpha" in last and "Traceback" not in bad.stderr
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))  # nothing destroyed

    for args, word in [(("--config.method.alhpa=0.1",), "alhpa"),
                       (("--config.method.alpha=abc",), "abc"),
                       (("--config", "configs/missing.py"), "missing.py")]:
        bad = run_main(*common, *args)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
        last = bad.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and word in last, last


def test_grid_upscales_tiles_and_writes_captions(tmp_path):
    images = np.zeros((3, 32, 32, 3), np.float32)
    images[1] = 1.0
    plain = sampling.grid_image(images, columns=2, upscale=1)
    assert plain.shape == (2 * 34 - 2, 2 * 34 - 2, 3)
    grid = sampling.save_grid(images, str(tmp_path / "g" / "grid.png"), columns=2,
                              captions=["a red circle above a blue square", "b", "c"])
    tile = 128  # 32x32 samples are upscaled 4x (nearest) by default
    assert grid.shape[1] == 2 * (tile + 2) - 2 and grid.shape[0] > 2 * tile
    assert (grid[:tile, tile + 2:2 * tile + 2] == 255).all()  # the white sample, upscaled
    caption = grid[tile:tile + 20, :tile]
    assert (caption < 128).any() and (caption == 255).any()  # dark text on white
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g" / "grid.png")), grid)


def test_paths_write_move_and_hparams(tmp_path):
    from leapalign_jax import paths

    target = str(tmp_path / "a" / "b.txt")
    paths.write_text(target, "x")
    assert paths.read_text(target) == "x" and paths.listdir(tmp_path / "a") == ["b.txt"]
    paths.move(tmp_path / "a", tmp_path / "c" / "moved")
    assert paths.read_text(tmp_path / "c" / "moved" / "b.txt") == "x"
    assert not paths.exists(tmp_path / "a")
    assert paths.join("gs://bucket/run", "eval", "base") == "gs://bucket/run/eval/base"
    assert paths.join("rel", "x") == os.path.join(os.path.abspath("rel"), "x")
    flat = train.flat_hparams(tiny_config())
    assert flat["train.steps"] == 12 and flat["method.name"] == "leapalign"
    assert isinstance(flat["mesh.shape"], str)
