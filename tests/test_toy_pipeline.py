"""End-to-end smoke run of the default job on a seconds-sized shapes world."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from leapalign_jax import config_lib
from leapalign_jax.toy import checker, prompts
from leapalign_jax.world import build_world
from tests import notebook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(*args):
    return subprocess.run([sys.executable, "-m", "leapalign_jax.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _build(cache, hash_seed: str) -> None:
    """Builds the :tiny world's models into `cache` in a fresh process."""
    build = ("import sys; sys.path.insert(0, '.'); import configs.toy_leapalign as c; "
             "from leapalign_jax.toy import world; cfg = c.get_config('tiny'); "
             "cfg.world.cache_dir = sys.argv[1]; world.build_models(cfg.world)")
    done = subprocess.run([sys.executable, "-c", build, str(cache)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONHASHSEED=hash_seed))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """The :tiny world built once (the main job below reuses it; the reproducibility test
    builds it again in another process and compares)."""
    cache = tmp_path_factory.mktemp("tiny_world")
    _build(cache, hash_seed="1")
    return cache


@pytest.fixture(scope="module")
def notebook_run(built_cache, tmp_path_factory):
    """The Colab quickstart executed top to bottom in test mode: its main job is the :tiny
    default job on the built world. Returns (workdir, the notebook's text, MIME types)."""
    workdir = tmp_path_factory.mktemp("notebook") / "run"
    env = {"LEAPALIGN_TEST_MODE": "1", "LEAPALIGN_WORKDIR": str(workdir),
           "LEAPALIGN_CACHE_DIR": str(built_cache), "JAX_PLATFORMS": "cpu",
           "FLUX_PATH": str(workdir.parent / "no-flux-here"),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    with pytest.MonkeyPatch.context() as m:
        for key, value in env.items():
            m.setenv(key, value)
        m.delenv("LEAPALIGN_REPO", raising=False)  # found from the notebook's folder
        text, mimes = notebook.execute()
    return workdir, text, mimes


def test_quickstart_notebook_runs_in_test_mode(notebook_run, built_cache):
    workdir, text, mimes = notebook_run
    assert "test mode: True" in text
    assert f"repository: {ROOT}" in text
    installs = text.split("requirements to install:")[1].splitlines()[0].split()
    assert installs and not any(r.split(">")[0].split("=")[0] in ("jax", "jaxlib", "libtpu")
                                for r in installs), installs
    # The before/after table, shown as Markdown, and the summary read from results.json.
    assert "| model |" in text and "| base |" in text
    assert re.search(r"\| leapalign \(step \d+\) \|", text), text
    assert "acc_overall" in text and "-> aligned" in text
    # An image grid (IPython.display.Image) and the two matplotlib figures.
    assert mimes.count("image/png") >= 3, mimes
    assert "reward_mean" in text and "TensorBoard not started" in text
    assert "skipping the FLUX section: FLUX_PATH=" in text
    assert "--config.model.lora.rank=" in text
    # The run wrote to the given workdir and cache, not into the checkout.
    assert (workdir / "results.md").is_file() and list((workdir / "images").glob("*.png"))
    assert list(built_cache.glob("generator-*"))


def test_tiny_shapes_world_train_then_evaluate(notebook_run, built_cache, tmp_path):
    """The default job's outputs (run by the notebook): the table, each evaluation's
    images and records; a second run only evaluates."""
    workdir, cache = notebook_run[0], built_cache
    common = ["--config", "configs/toy_leapalign.py:tiny", "--workdir", str(workdir),
              f"--config.world.cache_dir={cache}"]
    assert len([f for f in os.listdir(cache) if f.endswith(".msgpack")]) == 4
    table = (workdir / "results.md").read_text()
    assert "acc_overall" in table and "fd" in table and "| leapalign (step 2) |" in table

    for name in ("base", "step_000002"):
        out = workdir / "eval" / name
        results = json.loads((out / "results.json").read_text())
        assert 0.0 <= results["acc_overall"] <= 1.0 and results["fd"] >= 0.0
        records = [json.loads(l) for l in (out / "prompts.jsonl").read_text().splitlines()]
        assert len(records) == results["num_images"] == len(os.listdir(out / "images"))
        assert {"file", "prompt", "category", "spec", "passed", "reward"} <= set(records[0])
        assert os.path.exists(out / records[-1]["file"])
        # results.json agrees with the per-image records an external checker would use
        by_cat = {}
        for r in records:
            by_cat.setdefault(r["category"], []).append(r["passed"])
        overall = sum(sum(v) / len(v) for v in by_cat.values()) / len(by_cat)
        assert abs(overall - results["acc_overall"]) < 1e-9
        assert {len(v) for v in by_cat.values()} == {4}  # images_per_category of :tiny

    # A second run reuses the cached world and the finished checkpoint: evaluate only.
    again = main(*common, "--config.task=evaluate", "--config.eval_name=again")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "pretrain" not in again.stderr  # nothing rebuilt
    again_results = json.loads((workdir / "eval" / "again" / "results.json").read_text())
    step2 = json.loads((workdir / "eval" / "step_000002" / "results.json").read_text())
    log = again.stderr[-3000:]
    assert abs(again_results["acc_overall"] - step2["acc_overall"]) < 1e-9, log
    assert abs(again_results["reward"] - step2["reward"]) < 1e-5, log

    # A prompt file (read by data.read_prompts) is walked in epochs by data.PromptStream:
    # each prompt once per epoch, and a host's rows are its slice of the global batch.
    texts = ["a red circle", "a blue square", "a red square", "a blue circle",
             "a green triangle"]
    prompt_file = tmp_path / "mine.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    config = config_lib.load_config(os.path.join(ROOT, "configs", "toy_leapalign.py:tiny"))
    config.world.update(cache_dir=str(cache), prompt_file=str(prompt_file))
    config.train.batch_size = 2
    world = build_world(config)
    ids = np.concatenate([world.train_batch(s)["prompt_id"] for s in range(5)])
    names = [prompts.all_prompts()[i].text for i in ids]
    assert sorted(names[:5]) == sorted(texts) and sorted(names[5:]) == sorted(texts)
    assert world.train_batch(3, rows=np.array([1]))["prompt_id"].tolist() == [ids[7]]


def test_world_build_is_bitwise_reproducible_across_processes(built_cache, tmp_path):
    """Two processes (other hash seeds) building the same world write byte-identical model
    files."""
    _build(tmp_path / "b", hash_seed="2")
    files = [{f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))
              if f.endswith(".msgpack")} for folder in (built_cache, tmp_path / "b")]
    assert list(files[0]) == list(files[1]) and len(files[0]) == 4
    assert all(files[0][f] == files[1][f] for f in files[0])


def test_shipped_models_are_used_when_their_knobs_match_and_checked(built_cache, tmp_path,
                                                                     monkeypatch, caplog):
    """A world with no cache of its own takes the shipped files (nothing is trained); a
    shipped file that differs from its manifest is rebuilt; `rebuild.compare` reports
    identical files and the size of a difference."""
    from leapalign_jax.toy import (autoencoder, cache, pretrain, rebuild, reward,
                                   reward_tuning, shipped)
    from leapalign_jax.toy import world as toy_world

    config = config_lib.load_config(os.path.join(ROOT, "configs", "toy_leapalign.py:tiny"))
    wc = config.world
    monkeypatch.setattr(shipped, "SHIPPED_DIR", str(tmp_path / "shipped"))
    monkeypatch.setattr(shipped, "MANIFEST", str(tmp_path / "shipped" / "manifest.json"))
    record = rebuild.ship(str(built_cache), wc)
    assert sorted(record["files"]) == sorted(toy_world.model_files(wc).values())
    assert rebuild.compare(str(built_cache), wc)[0] == 0

    def no_training(*args, **kwargs):
        raise AssertionError("trained a model that is shipped")

    with monkeypatch.context() as m:
        for module, name in ((autoencoder, "train_autoencoder"), (reward, "train_reward"),
                             (pretrain, "pretrain"), (reward_tuning, "tune_reward")):
            m.setattr(module, name, no_training)
        wc.cache_dir = str(tmp_path / "fresh")
        models = toy_world.build_models(wc)
    for kind, name in toy_world.model_files(wc).items():  # and now cached there too
        assert (tmp_path / "fresh" / name).read_bytes() == (built_cache / name).read_bytes()
    like = cache.load_params(str(built_cache / toy_world.model_files(wc)["vae"]), models["vae"])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(like),
                                                     jax.tree.leaves(models["vae"])))

    # A rebuild that came out different is reported with the size of the difference.
    name = toy_world.model_files(wc)["vae"]
    other = tmp_path / "other"
    shutil.copytree(built_cache, other)
    first = jax.tree_util.tree_flatten_with_path(models["vae"])[0][0][0]
    cache.save_params(str(other / name), jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.25 if path == first else a, models["vae"]))
    differs, lines = rebuild.compare(str(other), wc)
    assert differs == 1 and f"{name} DIFFERS: largest parameter difference 0.25" in lines[0], lines

    # A damaged shipped file is not used: a warning, then the model is built.
    damaged = tmp_path / "shipped" / name
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 1
    damaged.write_bytes(bytes(data))
    assert shipped.load(name, lambda: models["vae"]) is None
    assert "differs from its manifest" in caplog.text


def test_reward_signal_benchmark_on_the_tiny_world(built_cache, tmp_path):
    """benchmarks/reward_signal.py: best-of-N picks the highest-reward sample, the ceiling
    bounds the pick, descent on the hinge raises the reward (of the clean latents, and of
    the initial noise through the rollout), and a lambda below every reward leaves the
    latents where they are."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import reward_signal

    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    result = reward_signal.main(["--tiny", "--cache-dir", str(cache), "--per-category", "2",
                                 "--samples", "3", "--step", "0.5", "--ascent-steps", "3",
                                 "--hinge-lambdas", "1.0", "-1.0", "--noise-steps", "3",
                                 "--noise-step", "0.5", "--out", str(tmp_path / "out")])
    rank = result["ranking"]
    assert rank["reward_pick_mean"] >= rank["reward_one"]
    assert all(rank["any_correct"][c] >= rank["reward_pick"][c] for c in rank["reward_pick"])
    plain, none = (run["points"] for run in result["ascent"])
    assert [p["step"] for p in plain] == [0, 3] and plain[0]["latent_rms_change"] == 0
    assert plain[-1]["reward"] > plain[0]["reward"] and plain[-1]["latent_rms_change"] > 1
    assert none[-1]["latent_rms_change"] == 0 and none[-1]["reward"] == none[0]["reward"]
    # Through the rollout: the same start, and the reward rises as the noise moves.
    noise = result["noise_ascent"]
    assert [p["step"] for p in noise] == [0, 3] and noise[0] == plain[0]
    assert noise[-1]["reward"] > noise[0]["reward"] and noise[-1]["latent_rms_change"] > 0
    text = (tmp_path / "out" / "reward_signal.md").read_text()
    assert "the reward's pick" in text and "ascent on the initial noise" in text


def test_prompt_order_measures_order_following_with_the_checker():
    """benchmarks/prompt_order.py: every swap is a valid prompt that no render of the
    original satisfies; a generator that draws what it is asked has an order effect equal
    to its "either" rate, one that draws the same scene for P and P' has none."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import prompt_order

    from leapalign_jax.toy import scenes

    every = prompts.all_prompts()
    index = {p.text: i for i, p in enumerate(every)}
    rng = np.random.default_rng(0)
    for category in prompt_order.CATEGORIES:
        for p in prompt_order.chosen_prompts(category, 16, 0):
            q = prompt_order.swapped(p)
            assert q.text in index and q != p and prompt_order.swapped(q) == p
            render = scenes.render_batch([prompts.scene_for_prompt(p, rng)])[0]
            assert checker.check(render, p) and not checker.check(render, q)

    def batch_of(chosen):
        return {"cond": {}, "prompt_id": np.asarray([index[p.text] for p in chosen])}

    def draw(canonical):
        def sample(params, batch, key):
            draw_rng = np.random.default_rng(int(jax.random.key_data(key).sum()))
            asked = [canonical(every[i]) for i in batch["prompt_id"]]
            return scenes.render_batch([prompts.scene_for_prompt(p, draw_rng) for p in asked])
        return sample

    group = prompt_order.chosen_prompts("position", 6, 1)
    follows = prompt_order.images_follow_order(draw(lambda p: p), None, batch_of, group, 2, 0)
    assert follows["order_effect"] == follows["either"] == 1.0
    blind = prompt_order.images_follow_order(
        draw(lambda p: min(p, prompt_order.swapped(p), key=lambda x: x.text)), None, batch_of,
        group, 2, 0)
    assert blind["order_effect"] == 0.0 and blind["either"] == 1.0
    a = np.random.default_rng(1).normal(size=(3, 4, 5))
    assert prompt_order.relative_change(a, a) == 0.0
    np.testing.assert_allclose(prompt_order.relative_change(a, 3 * a), 2.0)


def test_prompt_order_benchmark_on_the_tiny_world(built_cache, tmp_path):
    """The benchmark runs end to end on the tiny world and writes its table; a --runs
    folder without checkpoints is a one-line error and writes nothing."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import prompt_order

    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    args = ["--tiny", "--cache-dir", str(cache), "--prompts", "3", "--samples", "2"]
    with pytest.raises(SystemExit, match="no checkpoints/ folder"):
        prompt_order.main(args + ["--runs", str(tmp_path), "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
    result = prompt_order.main(args + ["--out", str(tmp_path / "out")])
    for category in prompt_order.CATEGORIES:
        cond = result["conditioning"][category]
        assert all(v > 0 for v in cond.values()), cond
        rates = result["generators"]["base"][category]
        assert 0 <= rates["either"] <= 1 and abs(rates["order_effect"]) <= rates["either"]
    text = (tmp_path / "out" / "prompt_order.md").read_text()
    assert "| base | 0 | position |" in text and "order effect" in text


def test_supervised_reference_benchmark_on_the_tiny_world(built_cache, tmp_path):
    """The supervised reference fine-tunes the tiny world's generator on exact renders and
    evaluates its EMA like every method; the table holds the base and each point."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import supervised_reference

    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    result = supervised_reference.main([
        "--tiny", "--cache-dir", str(cache), "--steps", "2", "--eval-every", "2",
        "--batch-size", "4", "--learning-rates", "1e-3", "--best-of", "2",
        "--out", str(tmp_path / "out")])
    (point,) = result["runs"]["0.001"]
    assert point["step"] == 2 and np.isfinite(point["loss"])
    assert 0 <= point["results"]["acc_overall"] <= 1
    # The EMA moved off the base: its samples (same noise) are not the base's.
    assert point["results"]["fd"] != result["base"]["fd"]
    # Any of 2 samples passing: at least as often as the first sample alone, per category.
    from leapalign_jax.config_lib import load_config
    from leapalign_jax.toy import world as shapes_world
    config = load_config(os.path.join(ROOT, "configs", "toy_leapalign.py:tiny"))
    config.world.cache_dir = str(cache)
    models = shapes_world.build_models(config.world)
    one = supervised_reference.best_of_n(config, models, 1)
    assert all(result["best_of"][k] >= one[k] for k in one), (one, result["best_of"])
    text = (tmp_path / "out" / "supervised.md").read_text()
    assert "| base | 0 |" in text and "| supervised, lr 0.001 | 2 |" in text
    assert "| base, any of 2 samples passes | 0 |" in text


def test_reward_tuning_ranking_loss_counts_only_correct_over_incorrect_pairs():
    import jax.numpy as jnp

    from leapalign_jax.toy import reward_tuning

    rewards = jnp.array([[0.9, 0.2], [0.1, 0.5], [0.4, 0.6]])  # 3 images of 2 captions
    correct = jnp.array([[True, False], [False, True], [False, True]])
    got = float(reward_tuning.ranking_loss(rewards, correct, 10.0))
    # Caption 0: image 0 over images 1, 2; caption 1: images 1, 2 over image 0.
    pairs = [(0.9, 0.1), (0.9, 0.4), (0.5, 0.2), (0.6, 0.2)]
    want = np.mean([np.log1p(np.exp(10.0 * (bad - good))) for good, bad in pairs])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    none = jnp.zeros_like(correct)  # no correct image: no pair, no loss
    assert float(reward_tuning.ranking_loss(rewards, none, 10.0)) == 0.0


def test_reward_tuning_stage_of_the_world_build_and_its_benchmark(built_cache, notebook_run,
                                                                  tmp_path):
    """The world's last build stage tunes only the image tower (text tower and logit scale
    kept) and the world aligns with the tuned reward; benchmarks/reward_tuning.py runs the
    same stage with the same knobs to the same bits, and copies the other models as they
    are; `--from-tuned --generator-runs` tunes the tuned reward again on an aligned
    generator's samples too."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import reward_tuning as bench

    from leapalign_jax.toy import world as toy_world

    config = config_lib.load_config(os.path.join(ROOT, "configs", "toy_leapalign.py:tiny"))
    config.world.cache_dir = str(built_cache)
    files = toy_world.model_files(config.world)
    models = toy_world.build_models(config.world)
    tuned, contrastive = models["tuned_reward"], models["reward"]
    for part, same in (("image_tower", False), ("text_tower", True), ("logit_scale", True)):
        equal = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tuned[part]),
                                                      jax.tree.leaves(contrastive[part]))]
        assert all(equal) if same else not all(equal), part
    world = toy_world.build(config)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(world.frozen["reward"]),
                                                     jax.tree.leaves(tuned)))

    out_cache = tmp_path / "tuned"
    knobs = config.world.reward_tuning
    result = bench.main(["--tiny", "--cache-dir", str(built_cache), "--cache-out",
                         str(out_cache), "--rounds", str(knobs.rounds),
                         "--prompts", str(knobs.prompts), "--chunk", str(knobs.chunk),
                         "--ascent", *map(str, knobs.ascent), "--steps", str(knobs.steps),
                         "--rank-batch", str(knobs.rank_batch), "--batch", str(knobs.batch),
                         "--out", str(tmp_path / "out")])
    (only,) = result["rounds"]
    assert set(only["checker_accuracy_along_ascent"]) == {"0", "2"}
    assert set(only["pairwise_after"]) >= {"count", "position", "overall"}
    assert sorted(p.name for p in out_cache.iterdir()) == sorted(files.values())
    assert all((out_cache / name).read_bytes() == (built_cache / name).read_bytes()
               for name in files.values())
    assert "Held-out pairwise accuracy" in (tmp_path / "out" / "reward_tuning.md").read_text()

    aligned = notebook_run[0]  # a :tiny training run on this world, with its checkpoint
    common = ["--tiny", "--cache-dir", str(built_cache), "--rounds", "1", "--prompts", "8",
              "--chunk", "8", "--ascent", "0", "1", "--steps", "2", "--rank-batch", "4",
              "--batch", "4", "--from-tuned"]
    again = bench.main(common + ["--generator-runs", str(aligned), "--cache-out",
                                 str(tmp_path / "again"), "--out", str(tmp_path / "out2")])
    # It starts from the tuned reward the first call wrote, not from the contrastive one.
    assert again["pairwise_before"] == only["pairwise_after"]
    assert again["generators"] == ["base", str(aligned)] and again["start"] == "tuned"
    (round_,) = again["rounds"]
    assert [set(a) for a in round_["per_generator"]] == [{"0", "1"}] * 2
    assert str(aligned) in (tmp_path / "out2" / "reward_tuning.md").read_text()
    with pytest.raises(SystemExit, match="no checkpoint there"):
        bench.main(common + ["--generator-runs", str(tmp_path), "--cache-out",
                             str(tmp_path / "never"), "--out", str(tmp_path / "out3")])
    assert not (tmp_path / "never").exists()
