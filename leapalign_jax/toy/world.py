"""The shapes world as a `World`: built on first use, cached, then aligned and judged.

Build order (each step cached under `cache_dir/<hash of its knobs>/`): the autoencoder
(the frozen "VAE"), the reward model (the frozen, learned "HPSv2", trained contrastively
on renders), the generator (tiny Flux + text encoder, pretrained with the rectified-flow
loss), then the reward tuned on the generator's samples as labelled by the checker
(`reward_tuning.py`; `reward_tuning.rounds = 0` keeps the contrastive one). Alignment trains
the Flux only; the text encoder is frozen and every prompt's features are precomputed.
Evaluation samples held-out prompts and scores them with the exact checker, the reward
model and a Fréchet distance in the reward model's image features against renders.

Files (cache, prompt file, evaluation folders) go through `leapalign_jax.paths`, so they
may be local or gs://. On a pod, process 0 builds and writes each cached model while the
others wait, then read it; training rows and evaluation are split over the mesh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from leapalign_jax import evaluate as evaluate_lib
from leapalign_jax import data, flow, parallel, paths, sampling
from leapalign_jax.models.flux import Flux, abstract_params, init_params
from leapalign_jax.pipeline import Batch, Params, Pipeline, World
from leapalign_jax.toy import (autoencoder, cache, checker, pretrain, prompts, reward,
                               reward_tuning, scenes, shipped)


def shapes_config() -> ml_collections.ConfigDict:
    """Knobs of the "shapes" world."""
    c = ml_collections.ConfigDict()
    c.name = "shapes"
    c.cache_dir = "cache/shapes"  # built models; reused by every run with the same knobs
    # Take the models shipped in leapalign_jax/toy/shipped_models/ when their knobs match these
    # (seconds instead of ~40 minutes of building on 2 CPU cores); False builds them.
    # `python -m leapalign_jax.toy.rebuild --check` rebuilds them and compares bit for bit.
    c.prebuilt = True
    c.seed = 0  # seed of the world's models (independent of the run's config.seed)
    c.num_steps = 25  # Euler steps of the rollout, T (paper: 25)
    c.eval_steps = 25  # Euler steps when evaluating (the paper evaluates with 50)
    c.guidance_scale = 2.0  # classifier-free guidance scale; 1.0 = off (one network call)
    # Evaluation: images per category, cycling through its held-out prompts, so that each
    # category's accuracy (overall is their mean) is measured to the same precision.
    c.images_per_category = 96
    c.num_grid_prompts = 16  # prompts in the PNG grids written during training
    # A UTF-8 text file of alignment prompts, one per line (blank lines and lines starting
    # with '#' skipped), each a shapes-world prompt; "" = the train split.
    c.prompt_file = ""
    c.ae_steps = 1200  # autoencoder training steps
    c.ae_batch = 32
    c.reward_steps = 3000  # reward-model training steps
    c.reward_batch = 32
    c.model = ml_collections.ConfigDict(dict(
        hidden_size=128, num_heads=4, axes_dim=(4, 14, 14), depth=2, depth_single_blocks=2,
        mlp_ratio=4.0, dtype="float32", remat="none",
        text_dim=64, text_width=64, text_depth=2,  # the toy "T5 + CLIP" text encoder
        # 5000 steps: base held-out accuracy ~0.45, mostly failing colour binding
        pretrain_steps=5000, pretrain_batch=64, learning_rate=1e-3,
        caption_dropout=0.1))  # share of empty captions, for classifier-free guidance
    # The last build stage: the reward tuned on the generator's samples (see its knobs).
    c.reward_tuning = reward_tuning.tuning_config()
    return c


def _knob_hash(**knobs: Any) -> str:
    return hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:12]


def _cached(path: str, build: Callable[[], Params], like: Callable[[], Params],
            prebuilt: bool = True) -> Params:
    """Loads `path` when it exists (and matches `like`); else, with `prebuilt`, the file of
    the same name shipped with the package (`toy/shipped.py`); else builds it. What was
    not found at `path` is saved there.

    Built once per job: process 0 loads or builds and saves; the others wait at a barrier
    and then read what it wrote.
    """
    # The structure to read into, traced rather than run: an eager flax init compiles every
    # op one by one (seconds per model at each start).
    template = lambda: jax.eval_shape(like)  # noqa: E731
    if paths.is_writer():
        try:
            params = cache.load_params(path, template()) if paths.exists(path) else None
        except ValueError as e:
            logging.warning("rebuilding %s: %s", path, e)
            params = None
        if params is None:
            params = (prebuilt and shipped.load(os.path.basename(path), template)) or build()
            cache.save_params(path, params)
    paths.barrier(f"cache:{path}")
    if not paths.is_writer():
        params = cache.load_params(path, template())
    return params


def model_files(wc: ml_collections.ConfigDict) -> dict[str, str]:
    """{"vae" | "reward" | "generator" [| "tuned_reward"]: file name in `cache_dir`}, each
    named by the hash of the knobs that decide its bits (including those of the models it
    is built from). "tuned_reward" only while `reward_tuning.rounds > 0`."""
    ae_key = _knob_hash(steps=wc.ae_steps, batch=wc.ae_batch, seed=wc.seed)
    rw_key = _knob_hash(steps=wc.reward_steps, batch=wc.reward_batch, seed=wc.seed,
                        version=reward.VERSION)
    gen_key = _knob_hash(ae=ae_key, model=wc.model.to_dict(), seed=wc.seed)
    files = {"vae": f"autoencoder-{ae_key}.msgpack", "reward": f"reward-{rw_key}.msgpack",
             "generator": f"generator-{gen_key}.msgpack"}
    if wc.reward_tuning.rounds:
        tuned_key = _knob_hash(reward=rw_key, generator=gen_key, seed=wc.seed,
                               tuning=wc.reward_tuning.to_dict(), num_steps=wc.num_steps,
                               guidance_scale=wc.guidance_scale)
        files["tuned_reward"] = f"reward-tuned-{tuned_key}.msgpack"
    return files


def build_models(wc: ml_collections.ConfigDict) -> dict[str, Params]:
    """The world's frozen VAE and reward and its pretrained generator, cached."""
    seed = jax.random.split(jax.random.key(wc.seed), 3)
    names = {k: paths.join(wc.cache_dir, v) for k, v in model_files(wc).items()}
    vae = _cached(names["vae"],
                  lambda: autoencoder.train_autoencoder(seed[0], wc.ae_steps, wc.ae_batch),
                  lambda: autoencoder.init_autoencoder(seed[0]), wc.prebuilt)
    rw = _cached(names["reward"],
                 lambda: reward.train_reward(seed[1], wc.reward_steps, wc.reward_batch),
                 lambda: reward.init_reward(seed[1]), wc.prebuilt)
    generator = _cached(names["generator"],
                        lambda: pretrain.pretrain(seed[2], vae, wc.model)[0],
                        lambda: _init_generator(seed[2], wc.model), wc.prebuilt)
    models = {"vae": vae, "reward": rw, "generator": generator}
    if "tuned_reward" in names:
        def tune() -> Params:
            _, pipe, batch_of = make_pipeline(wc, generator)
            return reward_tuning.tune_reward(rw, [generator["flux"]], pipe, {"vae": vae},
                                             batch_of, wc.reward_tuning, wc.seed)[0]
        models["tuned_reward"] = _cached(names["tuned_reward"], tune,
                                         lambda: reward.init_reward(seed[1]), wc.prebuilt)
    return models


def world_reward(models: dict[str, Params]) -> Params:
    """The reward the world aligns with and evaluates by: the tuned one when built."""
    return models.get("tuned_reward", models["reward"])


def _init_generator(rng: jax.Array, model: ml_collections.ConfigDict) -> Params:
    return {"flux": init_params(pretrain.flux_config(model), rng),
            "text": pretrain.init_text_encoder(rng, pretrain.text_encoder(model))}


def guided_velocity(flux: Flux, scale: float, uncond: dict[str, np.ndarray]
                    ) -> Callable[..., jax.Array]:
    """`velocity(params, x, sigma, cond)`; with `scale != 1`, classifier-free guidance
    `v_u + scale (v_c - v_u)` against the empty prompt's features."""
    img_ids = flow.image_ids(pretrain.TOKENS_HW, pretrain.TOKENS_HW)

    def call(params, x, sigma, txt, y):
        b = x.shape[0]
        txt_ids = jnp.broadcast_to(flow.text_ids(txt.shape[1]), (b, txt.shape[1], 3))
        return flux.apply({"params": params}, x, jnp.broadcast_to(img_ids, (b,) + img_ids.shape),
                          txt, txt_ids, sigma, y)

    def velocity(params, x, sigma, cond):
        if scale == 1.0:
            return call(params, x, sigma, cond["txt"], cond["y"])
        b = x.shape[0]
        txt = jnp.concatenate([cond["txt"], jnp.broadcast_to(uncond["txt"], cond["txt"].shape)])
        y = jnp.concatenate([cond["y"], jnp.broadcast_to(uncond["y"], cond["y"].shape)])
        v = call(params, jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]), txt, y)
        return v[b:] + scale * (v[:b] - v[b:])

    return velocity


def read_prompt_file(path: str) -> list[prompts.Prompt]:
    """The shapes-world prompts listed in `path`, read by `data.read_prompts` (a .txt file,
    one per line; .jsonl with a "prompt" field; a .json list), repeats kept.

    Raises FileNotFoundError / ValueError (one line naming the file and the fix) for a
    missing, empty or non-UTF-8 file and for a prompt that is not a shapes-world prompt.
    """
    chosen = []
    for number, text in enumerate(data.read_prompts(path), 1):
        try:
            chosen.append(prompts.prompt_by_text(text))
        except ValueError:
            raise ValueError(f"{path}: prompt {number} {text!r} is not a shapes-world prompt; "
                             "see the templates in leapalign_jax/toy/prompts.py") from None
    heldout = {p.text for p in prompts.heldout_prompts()}
    leaked = sum(p.text in heldout for p in chosen)
    if leaked:
        logging.warning("%d prompt(s) of %s are held-out evaluation prompts", leaked, path)
    return chosen


def prompt_batcher(generator: Params, wc: ml_collections.ConfigDict
                   ) -> Callable[[Sequence[prompts.Prompt]], Batch]:
    """`batch_of(chosen prompts) -> Batch`: every shapes-world prompt's text features,
    encoded once by the generator's frozen text encoder, then looked up."""
    every = prompts.all_prompts()
    index = {p.text: i for i, p in enumerate(every)}
    table = pretrain.encode_prompts(generator["text"], wc.model, [p.text for p in every])

    def batch_of(chosen: Sequence[prompts.Prompt]) -> Batch:
        ids = np.asarray([index[p.text] for p in chosen])
        return {"cond": {"txt": table["txt"][ids], "y": table["y"][ids]},
                "tokens": table["tokens"][ids], "prompt_id": ids.astype(np.int32)}

    return batch_of


def make_pipeline(wc: ml_collections.ConfigDict, generator: Params
                  ) -> tuple[Flux, Pipeline, Callable[[Sequence[prompts.Prompt]], Batch]]:
    """(flux, pipeline, batch_of) of the world's generator: guided velocity, decoder and
    reward of `frozen["vae"]` and `frozen["reward"]`, the rollout's sigmas."""
    flux = Flux(pretrain.flux_config(wc.model))
    batch_of = prompt_batcher(generator, wc)
    uncond = pretrain.encode_prompts(generator["text"], wc.model, [""])
    uncond = {"txt": uncond["txt"][0], "y": uncond["y"][0]}

    def decode(frozen: Params, x: jax.Array) -> jax.Array:
        z = flow.unpack_latents(x, autoencoder.LATENT_HW, autoencoder.LATENT_HW,
                                patch_size=pretrain.PATCH)
        return autoencoder.decode(frozen["vae"], z)

    def reward_of(frozen: Params, images: jax.Array, batch: Batch) -> jax.Array:
        return reward.reward_fn(frozen["reward"], images, batch["tokens"])

    seq = pretrain.TOKENS_HW ** 2
    pipe = Pipeline(velocity=guided_velocity(flux, wc.guidance_scale, uncond), decode=decode,
                    reward=reward_of, sigmas=flow.flux_sigmas(wc.num_steps, seq),
                    latent_shape=(seq, flux.config.in_channels))
    return flux, pipe, batch_of


def build(config: ml_collections.ConfigDict) -> World:
    """The shapes world for `config` (models built or loaded from the cache)."""
    wc = config.world
    reward_tuning.check_config(wc.reward_tuning)  # before anything is built or loaded
    pool = read_prompt_file(wc.prompt_file) if wc.prompt_file else prompts.train_prompts()
    models = build_models(wc)
    flux, pipe, batch_of = make_pipeline(wc, models["generator"])

    stream = data.PromptStream(len(pool), config.train.batch_size, config.seed) \
        if wc.prompt_file else None

    def train_batch(step: int, rows: np.ndarray | None = None) -> Batch:
        """Step `step`'s batch, or only its rows `rows` (this process's share on a pod).

        The global batch is a function of (seed, step) alone, so a resumed run and every
        topology see the same global batches. A prompt file is walked in epochs by
        `data.PromptStream`, as the flux world walks its prompt sets; the built-in pool is
        drawn category first (`prompts.sample_prompts`), since its position prompts
        outnumber the single-object ones by a hundred to one.
        """
        if stream is not None:
            ids = stream.global_ids(step)
            chosen = [pool[int(i)] for i in (ids if rows is None else ids[np.asarray(rows)])]
            return batch_of(chosen)
        rng = np.random.default_rng([config.seed, step])
        chosen = prompts.sample_prompts(rng, config.train.batch_size, pool)
        return batch_of(chosen if rows is None else [chosen[int(i)] for i in rows])

    frozen = {"vae": models["vae"], "reward": world_reward(models)}
    heldout = prompts.heldout_prompts()
    grid = [heldout[i] for i in np.linspace(0, len(heldout) - 1, wc.num_grid_prompts,
                                            dtype=int)]
    param_axes = abstract_params(flux.config)
    mesh = parallel.make_mesh(config.mesh.shape)

    def evaluate(params: Params, out_dir: str) -> dict[str, Any]:
        return evaluate_heldout(pipe, params, frozen, batch_of, wc, out_dir, mesh=mesh)

    return World(pipe=pipe, params=models["generator"]["flux"], param_axes=param_axes,
                 frozen=frozen, train_batch=train_batch, eval_batch=batch_of(grid),
                 model=flux.config,
                 eval_prompts=[p.text for p in grid],
                 fingerprint={"world": "shapes", "model": wc.model.to_dict(),
                              "prompt_file": wc.prompt_file,
                              "num_steps": wc.num_steps, "seed": wc.seed,
                              "guidance_scale": wc.guidance_scale,
                              "ae_steps": wc.ae_steps, "reward_steps": wc.reward_steps,
                              "reward_version": reward.VERSION,
                              "reward_tuning": wc.reward_tuning.to_dict()},
                 evaluate=evaluate)


def image_features(reward_params: Params, images: np.ndarray) -> np.ndarray:
    """The reward model's unnormalised image embeddings, the features of the FD."""
    apply = jax.jit(lambda p, x: reward.RewardModel().apply(
        {"params": p}, x, method=lambda m, y: m.image_tower(y)))
    return np.concatenate([np.asarray(apply(reward_params, images[i:i + 512]))
                           for i in range(0, len(images), 512)])


def heldout_specs(per_category: int) -> list[prompts.Prompt]:
    """`per_category` prompts of each category, cycling through its held-out prompts."""
    held = prompts.heldout_prompts()
    specs = []
    for cat in prompts.CATEGORIES:
        group = [p for p in held if p.category == cat]
        specs += [group[i % len(group)] for i in range(per_category)]
    return specs


def evaluate_heldout(pipe: Pipeline, params: Params, frozen: Params,
                     batch_of: Callable[[list], Batch], wc: ml_collections.ConfigDict,
                     out_dir: str, chunk: int = 256,
                     mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """`images_per_category` held-out images per category: reward, checker accuracy, FD
    against renders.

    With a `mesh`, each chunk is split over its data axes and the images gathered to every
    process (`sampling.on_mesh`); all processes compute the same results and process 0
    writes the folder.
    """
    specs = heldout_specs(wc.images_per_category)
    sample = sampling.make_sample_fn(pipe, flow.flux_sigmas(wc.eval_steps,
                                                            pipe.latent_shape[0]))
    score = jax.jit(pipe.reward)

    def sample_and_score(params, frozen, batch, rng):
        imgs = sample(params, frozen, batch, rng)
        return imgs, score(frozen, imgs, batch)

    images, rewards = [], []
    base = jax.random.key(wc.seed + 1000)  # same noise for every model evaluated
    for start in range(0, len(specs), chunk):
        batch = batch_of(specs[start:start + chunk])
        imgs, scores = sampling.on_mesh(sample_and_score, mesh, params, frozen, batch,
                                        jax.random.fold_in(base, start))
        images.append(np.asarray(imgs))
        rewards.append(np.asarray(scores))
    images, rewards = np.concatenate(images), np.concatenate(rewards)
    passed = [checker.check(image, p) for image, p in zip(images, specs)]
    accuracy = checker.summarize(passed, specs)
    rng = np.random.default_rng(wc.seed + 2000)
    renders = scenes.render_batch([prompts.scene_for_prompt(p, rng) for p in specs])
    fd = evaluate_lib.frechet_distance(image_features(frozen["reward"], images),
                                       image_features(frozen["reward"], renders))
    results = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
               "fd": fd, "num_images": len(specs),
               **{f"acc_{k}": v for k, v in accuracy.items()}}
    records = [{"prompt": p.text, "category": p.category, "spec": dataclasses.asdict(p),
                "passed": ok, "reward": float(r)}
               for p, ok, r in zip(specs, passed, rewards)]
    evaluate_lib.write_eval(out_dir, images, records, results)
    return results
