"""The shapes world: renderer, prompts, exact checker, tokenizer, toy VAE and reward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from leapalign_jax.toy import (autoencoder, cache, checker, prompts, reward, scenes,
                               text_encoder, tokenizer)
from leapalign_jax.toy.scenes import Scene


def _pairs(n, seed=0, pool=None):
    return prompts.sample_pairs(np.random.default_rng(seed), n,
                                prompts.all_prompts() if pool is None else pool)


def _of(category):
    return [p for p in prompts.all_prompts() if p.category == category]


# --- renderer -------------------------------------------------------------------------


def test_render_is_deterministic_with_exact_palette():
    a = scenes.sample_scene(np.random.default_rng(7))
    b = scenes.sample_scene(np.random.default_rng(7))
    assert a == b
    np.testing.assert_array_equal(scenes.render(a), scenes.render(b))
    allowed = {(0, 0, 0)} | set(scenes.PALETTE.values())
    for scene in [scenes.sample_scene(np.random.default_rng(s)) for s in range(50)]:
        image = scenes.render(scene)
        assert image.dtype == np.float32 and image.shape == (32, 32, 3)
        found = {tuple(int(round(v)) for v in px) for px in (image * 255).reshape(-1, 3)}
        assert found <= allowed
        # Every object's pixels are its mask, in its exact colour.
        for obj in scene.objects:
            box = image[obj.y:obj.y + obj.size, obj.x:obj.x + obj.size]
            mask = scenes.shape_mask(obj.shape, obj.size)
            np.testing.assert_array_equal(box[mask], np.broadcast_to(
                scenes.color_rgb(obj.color), (mask.sum(), 3)))
            assert not box[~mask].any()


def test_shapes_have_distinct_geometry():
    for size in range(scenes.MIN_SIZE, scenes.MAX_SIZE + 1):
        square, circle, triangle = (scenes.shape_mask(s, size) for s in scenes.SHAPES)
        assert square.all()
        assert 0.75 < circle.mean() < 0.9 and circle.any(0).all() and circle.any(1).all()
        assert 0.5 < triangle.mean() < 0.65 and triangle[-1].all()  # base along the bottom
        assert triangle[0].sum() <= 2  # apex up


def test_objects_never_overlap_or_touch():
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = scenes.sample_scene(rng)
        assert 1 <= len(scene.objects) <= scenes.MAX_OBJECTS
        for i, a in enumerate(scene.objects):
            assert scenes.MIN_SIZE <= a.size <= scenes.MAX_SIZE
            assert a.x >= 0 and a.y >= 0 and a.x + a.size <= 32 and a.y + a.size <= 32
            for b in scene.objects[i + 1:]:
                gap_x = max(b.x - (a.x + a.size), a.x - (b.x + b.size))
                gap_y = max(b.y - (a.y + a.size), a.y - (b.y + b.size))
                assert max(gap_x, gap_y) >= scenes.GAP >= 1
        # One 8-connected component per object, whatever the colours.
        _, n = ndimage.label(scenes.render(scene).any(-1), structure=np.ones((3, 3)))
        assert n == len(scene.objects)
    with pytest.raises(ValueError, match="unknown object"):
        scenes.place(rng, [("purple", "circle")])


# --- prompts --------------------------------------------------------------------------


def test_prompt_set_and_split():
    all_p = prompts.all_prompts()
    assert len({p.text for p in all_p}) == len(all_p)
    train, held = prompts.split()
    assert {p.text for p in train}.isdisjoint({p.text for p in held})
    assert len(train) + len(held) == len(all_p)
    for cat in prompts.CATEGORIES:
        assert any(p.category == cat for p in train) and any(p.category == cat for p in held)
    assert [p.text for p in prompts.all_prompts()[:3]] == ["a square", "a circle", "a triangle"]
    assert prompts.prompt_by_text("three green circles") == prompts.Prompt(
        "counting", (("green", "circle"),), count=3)
    with pytest.raises(ValueError, match="not a shapes-world prompt"):
        prompts.prompt_by_text("a purple hexagon")


def test_scenes_for_prompts_satisfy_them_and_no_hard_negative():
    chosen, drawn = _pairs(300, seed=2)
    for p, s in zip(chosen, drawn):
        assert prompts.satisfies(s.objects, p), p.text
        if p.relation is not None:
            a, b = s.objects
            axis = 0 if p.relation in ("left of", "right of") else 1
            assert abs(a.center[axis] - b.center[axis]) >= prompts.SCENE_POSITION_MARGIN
        for kind, negative in prompts.hard_negatives(p):
            assert not prompts.satisfies(s.objects, negative), (p.text, kind, negative.text)


# --- checker --------------------------------------------------------------------------


def test_checker_scores_ground_truth_renders_perfectly():
    chosen, drawn = _pairs(360, seed=3)
    result = checker.score(scenes.render_batch(drawn), chosen)
    assert set(result) == set(prompts.CATEGORIES) | {"overall"}
    assert all(v == 1.0 for v in result.values()), result


def test_checker_detects_exact_objects():
    rng = np.random.default_rng(4)
    for _ in range(100):
        scene = scenes.sample_scene(rng)
        found = checker.detect(scenes.render(scene))
        assert sorted((d.color, d.shape, d.center) for d in found) == sorted(
            (o.color, o.shape, o.center) for o in scene.objects)


def _assert_corruption_fails(prompt_list, corrupt, seed):
    """Asserts the checker passes each clean render and fails its corrupted one."""
    rng = np.random.default_rng(seed)
    for p in prompt_list:
        scene = prompts.scene_for_prompt(p, rng)
        bad = corrupt(scene, p, rng)
        assert checker.check(scenes.render(scene), p), p.text
        assert not checker.check(scenes.render(bad), p), (p.text, bad)


def _replace(scene, i, **changes):
    objs = list(scene.objects)
    objs[i] = dataclasses.replace(objs[i], **changes)
    return Scene(tuple(objs))


def test_checker_fails_wrong_color():
    def corrupt(scene, p, rng):
        obj = scene.objects[0]
        return _replace(scene, 0, color=next(c for c in scenes.COLORS if c != obj.color))
    pool = _of("colors") + _of("counting")[::3] + _of("color_attr")[::6] + _of("position")[::40]
    _assert_corruption_fails(pool, corrupt, seed=5)


def test_checker_fails_wrong_shape():
    def corrupt(scene, p, rng):
        obj = scene.objects[0]
        return _replace(scene, 0, shape=next(s for s in scenes.SHAPES if s != obj.shape))
    pool = (_of("single_object") + _of("two_object") + _of("colors") + _of("counting")[::3]
            + _of("color_attr")[::6] + _of("position")[::40])
    _assert_corruption_fails(pool, corrupt, seed=6)


def test_checker_fails_wrong_count():
    def fewer(scene, p, rng):
        return Scene(scene.objects[1:])

    def more(scene, p, rng):
        extra = scenes.place(rng, [(o.color, o.shape) for o in scene.objects] + [
            (scene.objects[0].color, scene.objects[0].shape)])
        return extra

    counting = _of("counting")
    _assert_corruption_fails(counting[::2], fewer, seed=7)
    _assert_corruption_fails([p for p in counting if p.count < 4][::2], more, seed=8)
    _assert_corruption_fails(_of("single_object") + _of("colors")[::3], more, seed=9)


def test_checker_fails_swapped_position():
    def mirror(scene, p, rng):
        # Mirroring the layout along the relation's axis swaps the relation (shapes are
        # re-drawn upright) and keeps objects apart.
        if p.relation in ("left of", "right of"):
            objs = [dataclasses.replace(o, x=32 - o.x - o.size) for o in scene.objects]
        else:
            objs = [dataclasses.replace(o, y=32 - o.y - o.size) for o in scene.objects]
        return Scene(tuple(objs))
    _assert_corruption_fails(_of("position")[::8], mirror, seed=10)


def test_checker_fails_swapped_attributes():
    def swap(scene, p, rng):
        a, b = scene.objects
        return Scene((dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)))
    _assert_corruption_fails(_of("color_attr")[::4], swap, seed=11)


def test_checker_tolerates_noise_and_rejects_merged_blobs():
    chosen, drawn = _pairs(60, seed=12)
    noise = np.random.default_rng(0).normal(0, 0.05, (60, 32, 32, 3)).astype(np.float32)
    noisy = np.clip(scenes.render_batch(drawn) + noise, 0, 1)
    assert checker.score(noisy, chosen)["overall"] == 1.0
    # Two touching squares form one blob that is no single object.
    image = np.zeros((32, 32, 3), np.float32)
    image[4:12, 4:20] = scenes.color_rgb("red")
    assert checker.detect(image)[0].shape is None
    with pytest.raises(ValueError, match="score needs images"):
        checker.score(noisy[:3], chosen)


# --- tokenizer and text encoder -------------------------------------------------------


def test_tokenizer_round_trip():
    texts = [p.text for p in prompts.all_prompts()]
    ids = tokenizer.encode(texts)
    assert ids.dtype == np.int32 and ids.shape == (len(texts), tokenizer.MAX_LEN)
    assert tokenizer.decode(ids) == texts
    np.testing.assert_array_equal(tokenizer.mask(ids).sum(1), [len(t.split()) for t in texts])
    assert (ids[~tokenizer.mask(ids)] == tokenizer.PAD_ID).all()
    assert tokenizer.decode(tokenizer.encode(["a purple circle"])) == ["a [UNK] circle"]
    with pytest.raises(ValueError, match="more than max_len"):
        tokenizer.encode(["a " * 13])


def test_text_encoder_shapes_and_padding():
    module = text_encoder.TextEncoder()
    params = jax.jit(text_encoder.init_text_encoder)(jax.random.key(0))
    ids = jnp.asarray(tokenizer.encode(["a red circle", "two blue squares", ""]))
    feats, pooled = jax.jit(module.apply)({"params": params}, ids)
    assert feats.shape == (3, tokenizer.MAX_LEN, 64) and pooled.shape == (3, 64)
    assert float(jnp.abs(feats[0, 3:]).max()) == 0.0  # [PAD] positions
    assert bool(jnp.isfinite(pooled).all())
    assert not np.allclose(pooled[0], pooled[1])


# --- autoencoder and reward -----------------------------------------------------------


def test_autoencoder_trains_and_round_trips_shapes():
    params, losses = autoencoder.train_autoencoder(
        jax.random.key(0), steps=40, batch=8, progress=False, return_losses=True)
    assert np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.8 * losses[:5].mean()
    images = scenes.render_batch(_pairs(4, seed=13)[1])
    z = autoencoder.encode(params, images)
    assert z.shape == (4, 8, 8, 4)
    out = autoencoder.decode(params, z)
    assert out.shape == images.shape and float(out.min()) >= 0 and float(out.max()) <= 1


@pytest.fixture(scope="module")
def trained_reward():
    return reward.train_reward(jax.random.key(1), steps=60, batch=16, num_negatives=2,
                               progress=False, return_losses=True)


def test_reward_loss_falls(trained_reward):
    params, losses = trained_reward
    assert np.isfinite(losses).all()
    # On fixed batches the trained model beats a fresh one (~log(batch + negatives)).
    fresh = reward.init_reward(jax.random.key(123))
    rng = np.random.default_rng(17)
    loss = jax.jit(reward.contrastive_loss)
    for b in [reward.make_batch(rng, 16, 2, prompts.train_prompts()) for _ in range(3)]:
        args = (b["images"], b["ids"], b["negative_ids"], b["positive"])
        assert loss(params, *args) < 0.9 * loss(fresh, *args)


def test_reward_is_cosine_with_finite_image_gradient(trained_reward):
    params, _ = trained_reward
    chosen, drawn = _pairs(4, seed=14)
    images = jnp.asarray(scenes.render_batch(drawn))
    ids = jnp.asarray(tokenizer.encode([p.text for p in chosen]))
    r, grad = jax.jit(jax.value_and_grad(
        lambda x: reward.reward_fn(params, x, ids).sum()))(images)
    per_sample = jax.jit(reward.reward_fn)(params, images, ids)
    assert per_sample.shape == (4,) and bool((jnp.abs(per_sample) <= 1 + 1e-5).all())
    np.testing.assert_allclose(r, per_sample.sum(), rtol=1e-5)
    assert bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).max()) > 0


def test_reward_batches_and_training_negatives():
    batch = reward.make_batch(np.random.default_rng(15), 16, 3, prompts.train_prompts())
    assert batch["positive"].diagonal().all()
    assert batch["negative_ids"].shape == (16, 3, tokenizer.MAX_LEN)
    # "a circle" is also true of the image of "a red circle".
    single = prompts.prompt_by_text("a circle")
    scene = prompts.scene_for_prompt(prompts.prompt_by_text("a red circle"),
                                     np.random.default_rng(0))
    assert prompts.satisfies(scene.objects, single)
    # Training negatives avoid held-out captions wherever another negative exists.
    held = {p.text for p in prompts.heldout_prompts()}
    for p in prompts.train_prompts():
        texts = [t for group in reward._negatives_by_kind(p) for t in group]
        everything = [n.text for _, n in prompts.hard_negatives(p)]
        assert texts and (all(t not in held for t in texts)
                          or all(t in held for t in everything))


# --- cache ----------------------------------------------------------------------------


def test_cache_round_trip_and_errors(tmp_path):
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.ones(4)}}
    path = str(tmp_path / "sub" / "params.msgpack")
    cache.save_params(path, tree)
    back = cache.load_params(path, tree)
    np.testing.assert_array_equal(back["a"], tree["a"])
    with pytest.raises(ValueError, match="does not match"):
        cache.load_params(path, {"a": np.zeros((3, 2), np.float32), "b": {"c": np.ones(4)}})
    with pytest.raises(ValueError):
        cache.load_params(path, {"x": np.zeros(1)})
    with open(path, "wb") as f:
        f.write(b"\x00not msgpack")
    with pytest.raises(ValueError, match="corrupt"):
        cache.load_params(path, tree)
    with pytest.raises(FileNotFoundError):
        cache.load_params(str(tmp_path / "missing.msgpack"), tree)


def test_shipped_models_are_the_default_worlds_and_intact():
    """The files in toy/shipped_models/ are exactly the default knobs' (a knob change must
    come with `python -m leapalign_jax.toy.rebuild --update`), match their manifest, load
    as the models' trees, and the reward still scores as measured."""
    from leapalign_jax.toy import shipped, world

    wc = world.shapes_config()
    names = world.model_files(wc)
    files = shipped.manifest()["files"]
    assert sorted(files) == sorted(names.values()), (
        "the shipped models are not the default knobs'; run "
        "`python -m leapalign_jax.toy.rebuild --update` after changing them")
    seed = jax.random.split(jax.random.key(wc.seed), 3)
    likes = {"vae": lambda: autoencoder.init_autoencoder(seed[0]),
             "reward": lambda: reward.init_reward(seed[1]),
             "generator": lambda: world._init_generator(seed[2], wc.model),
             "tuned_reward": lambda: reward.init_reward(seed[1])}
    loaded = {kind: shipped.load(name, likes[kind]) for kind, name in names.items()}
    assert all(v is not None for v in loaded.values()), names
    # The reward sees layout, counts and binding: on held-out prompts the true caption
    # beats every kind of hard negative (issue goal: >= 0.97 per kind).
    for kind in ("reward", "tuned_reward"):
        accuracy = reward.pairwise_accuracy(loaded[kind], scenes_per_prompt=4)
        assert min(accuracy.values()) >= 0.97, (kind, accuracy)


@pytest.mark.parametrize("knob, value, match", [
    ("rounds", -1, "reward_tuning.rounds"), ("steps", 0, "reward_tuning.steps"),
    ("ascent", (), "reward_tuning.ascent"), ("ascent", (0, -2), "reward_tuning.ascent"),
    ("tune", ("image_tower", "text"), "reward_tuning.tune"),
])
def test_reward_tuning_rejects_bad_knobs_in_one_line(knob, value, match):
    from leapalign_jax.toy import reward_tuning

    knobs = reward_tuning.tuning_config()
    reward_tuning.check_config(knobs)  # the defaults pass
    knobs[knob] = value
    with pytest.raises(ValueError, match=match) as raised:
        reward_tuning.check_config(knobs)
    assert "\n" not in str(raised.value)
