"""The "flux" world: align FLUX.1-dev's transformer on a prompt file with a differentiable
reward, as the paper does.

    python -m leapalign_jax.main --config configs/flux_dev.py --workdir runs/dev \
        --config.world.checkpoint=/data/FLUX.1-dev --config.world.prompt_file=prompts/ \
        --config.world.reward_checkpoint=/data/clip-vit-large-patch14

What the world holds:

- the transformer (trainable): streamed from `checkpoint/transformer/` straight onto its
  shards of the mesh (`weights.sharded`), float32 master params unless
  `world.param_dtype` says otherwise, computing in `world.dtype`;
- the VAE decoder (frozen, differentiable, `world.vae_remat`), also streamed onto the mesh;
- the reward (frozen, differentiable): `rewards.load_reward(world.reward,
  world.reward_checkpoint)`; its text features are computed per prompt on the host side
  of the step and travel in the batch as `reward_text`;
- the prompts: `data.load_split(world.prompt_file)`'s train split in `data.PromptStream`
  order (each process reads only its rows of the global batch), and the test split (or
  `world.test_prompt_file`) for evaluation and image grids;
- the conditioning: T5 + CLIP embeddings read from `world.embeddings` (computed once by
  `task=embed`, see `leapalign_jax.embeddings`), in which case the text encoders are never
  loaded, or encoded step by step by T5 (sharded on the mesh) and CLIP.

`evaluate` samples `images_per_prompt` images per held-out prompt with `eval_steps` Euler
steps (the paper: 50) and writes the eval folder with the reward's mean and standard error.

The `:tiny` variant of configs/flux_dev.py sets `world.tiny`: a tiny random FLUX.1 folder
in the real layout (`weights.flux_folder.write_tiny_flux_folder`), a tiny HF CLIP folder
for the reward and a prompt folder are written once into `world.cache_dir` and everything
runs through the real loaders on CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors.numpy import save_file

from leapalign_jax import data, embeddings, evaluate, flow, flux_pipeline, parallel
from leapalign_jax import paths, rewards, sampling
from leapalign_jax.models import clip as clip_model
from leapalign_jax.models.flux import Flux, abstract_params
from leapalign_jax.pipeline import Batch, Params, Pipeline, World
from leapalign_jax.weights import flux_folder
from leapalign_jax.weights.clip import HF_TEXT_KEYS, HF_VISION_KEYS, plan_from_table
from leapalign_jax.weights.flux import read_flux_config

_log = logging.getLogger(__name__)


def flux_config() -> ml_collections.ConfigDict:
    """Knobs of the "flux" world (defaults: the paper's FLUX.1-dev setting)."""
    c = ml_collections.ConfigDict()
    c.name = "flux"
    c.checkpoint = ""  # the FLUX.1 folder (diffusers layout: model_index.json, transformer/, ...)
    # Train prompts: a .txt/.jsonl/.json file or a folder with train.* and test.* (data.py).
    c.prompt_file = ""
    c.test_prompt_file = ""  # held-out prompts; "" = the folder's test split / the hash split
    c.test_fraction = 0.0  # a single prompt_file: share of prompts held out by text hash
    # Precomputed T5 + CLIP embeddings (DIR of `--config.task=embed --workdir DIR`); with
    # them the text encoders are never loaded. "" = encode each step's prompts on the fly.
    c.embeddings = ""
    c.max_sequence_length = 512  # T5 tokens per prompt (FLUX.1-dev: 512)
    c.height = 720  # image size (paper: 720 x 720)
    c.width = 720
    c.num_steps = 25  # Euler steps of the training rollout, T (paper: 25)
    c.eval_steps = 50  # Euler steps when evaluating (paper: 50)
    c.guidance = 3.5  # FLUX.1-dev's distilled guidance input (not CFG)
    c.dtype = "bfloat16"  # compute dtype of the transformer, encoders and VAE
    c.param_dtype = "float32"  # master params of the trained transformer (bf16 files upcast)
    c.frozen_dtype = "bfloat16"  # params of the frozen T5, CLIP, VAE and reward
    c.remat = "dots_saveable"  # transformer block remat: none | full | dots_saveable
    c.vae_remat = "full"  # VAE decoder block remat (the decoder is differentiated)
    # The reward slot: a `rewards.load_reward` name and its checkpoint (HPSv2.1's .pt,
    # PickScore's or a CLIP folder); reward_tokenizer "" = the checkpoint's own.
    c.reward = "clip_score"
    c.reward_checkpoint = ""
    c.reward_tokenizer = ""
    c.reward_dtype = "bfloat16"  # reward compute dtype
    c.reward_remat = "full"  # reward vision tower remat
    # Evaluation: images_per_prompt images for each of the first num_eval_prompts held-out
    # prompts (0 = all), sampled eval_batch_size at a time; grids show num_grid_prompts.
    c.images_per_prompt = 4
    c.num_eval_prompts = 0
    c.eval_batch_size = 16
    c.num_grid_prompts = 8
    c.embed_batch_size = 16  # task=embed: prompts per encoder call
    c.embed_shard_size = 128  # task=embed: prompts per embeddings file
    # True: write (once) a tiny random FLUX.1 folder, CLIP reward folder and prompt folder
    # into cache_dir and use them where checkpoint / reward_checkpoint / prompt_file are "".
    c.tiny = False
    c.cache_dir = "cache/flux_tiny"
    return c


# ----------------------------------------------------------------------------- tiny folders

TINY_PROMPTS = {
    "train": ["a photo of a red cat", "a blue dog on the grass", "a small green square",
              "a large red circle", "a cat and a dog", "a blue circle in the snow",
              "a photo of a green dog", "the small blue cat", "a red square with a circle",
              "a large cat on a square"],
    "test": ["a photo of a blue cat", "a green circle on a red square", "a small dog",
             "the large blue square"],
}


def write_tiny_clip_folder(path: str, seed: int = 0) -> str:
    """A tiny random transformers `CLIPModel` folder (config.json, model.safetensors, a
    CLIP tokenizer) in the layout `rewards.load_reward("clip_score", path)` reads; no torch."""
    os.makedirs(path, exist_ok=True)
    vocab = flux_folder.write_clip_tokenizer(path)  # <|endoftext|> is the largest id
    text = clip_model.CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                     num_layers=1, num_heads=2, eos_token_id=vocab - 1,
                                     projection_dim=8)
    vision = clip_model.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=1,
                                         num_heads=2, image_size=32, patch_size=8,
                                         projection_dim=8)
    config = clip_model.CLIPConfig(text, vision)
    abstract = clip_model.abstract_params(config)
    params = flux_folder.random_params(abstract, seed)
    flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
    inverse = {"copy": lambda a: a, "linear": lambda a: a.T,
               "conv": lambda a: a.transpose(3, 2, 0, 1)}
    tensors = {"logit_scale": np.asarray(flat[("logit_scale",)] + 2.6592, np.float32)}
    for tower, table, prefix in (("text_model", HF_TEXT_KEYS, "text_model."),
                                 ("vision_model", HF_VISION_KEYS, "vision_model.")):
        for sub, plan in plan_from_table(abstract[tower], table, prefix).items():
            tensors[plan.key] = np.ascontiguousarray(inverse[plan.layout](flat[(tower,) + sub]))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    common = {"intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "hidden_size": 16, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    cfg = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 8,
           "logit_scale_init_value": 2.6592,
           "text_config": dict(common, vocab_size=vocab, max_position_embeddings=77,
                               bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                               pad_token_id=vocab - 1, projection_dim=8),
           "vision_config": dict(common, image_size=32, patch_size=8, num_channels=3,
                                 projection_dim=8)}
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    return path


def _write_once(target: str, write: Callable[[str], Any]) -> None:
    """`write(tmp)` then an atomic rename to `target`, by process 0; others wait."""
    if paths.is_writer() and not os.path.isdir(target):
        tmp = f"{target}.tmp{os.getpid()}"
        write(tmp)
        os.replace(tmp, target)
    paths.barrier(f"tiny:{target}")


def _write_prompts(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for split, prompts in TINY_PROMPTS.items():
        with open(os.path.join(folder, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(prompts) + "\n")


@dataclasses.dataclass(frozen=True)
class Sources:
    """Where the world's files are: the FLUX.1 folder, the reward and the prompts."""

    checkpoint: str
    reward_checkpoint: str
    prompt_file: str


def sources(wc: ml_collections.ConfigDict) -> Sources:
    """The configured paths; with `tiny`, the tiny folders (written once) fill the blanks."""
    checkpoint_, reward, prompts = wc.checkpoint, wc.reward_checkpoint, wc.prompt_file
    if wc.tiny:
        root = os.path.abspath(wc.cache_dir)
        os.makedirs(root, exist_ok=True)
        if not checkpoint_:
            checkpoint_ = os.path.join(root, "flux")
            _write_once(checkpoint_, lambda p: flux_folder.write_tiny_flux_folder(p, seed=0))
        if not reward:
            reward = os.path.join(root, "clip")
            _write_once(reward, lambda p: write_tiny_clip_folder(p, seed=1))
        if not prompts:
            prompts = os.path.join(root, "prompts")
            _write_once(prompts, _write_prompts)
    for value, knob, what in ((checkpoint_, "checkpoint", "a FLUX.1 folder in diffusers "
                               "layout (model_index.json, transformer/, vae/, ...)"),
                              (prompts, "prompt_file", "a prompt file or a folder with "
                               "train.txt and test.txt")):
        if not value:
            raise ValueError(f"config.world.{knob} is empty; set --config.world.{knob}= {what}"
                             " (or use configs/flux_dev.py:tiny)")
    return Sources(checkpoint_, reward, prompts)


def prompt_sets(wc: ml_collections.ConfigDict, src: Sources
                ) -> tuple[data.PromptSet, data.PromptSet]:
    """The train and held-out prompt sets."""
    test_path = wc.test_prompt_file or None
    train = data.load_split(src.prompt_file, "train", test_path=test_path,
                            test_fraction=wc.test_fraction)
    test = data.load_split(src.prompt_file, "test", test_path=test_path,
                           test_fraction=wc.test_fraction)
    return train, test


def _rules(config: ml_collections.ConfigDict) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.mesh.rules)


# ----------------------------------------------------------------------------- embed task


def embed(config: ml_collections.ConfigDict, workdir: str) -> dict[str, int]:
    """`task=embed`: T5 + CLIP embeddings of the train and held-out prompts (and any
    `sample.prompts`) into `workdir/embeddings/`, resuming what is there."""
    wc = config.world
    src = sources(wc)
    train, test = prompt_sets(wc, src)
    texts = list(train.texts) + list(test.texts) + _sample_prompts(config)
    mesh = parallel.make_mesh(config.mesh.shape)
    counts = embeddings.embed_prompts(
        src.checkpoint, texts, [data.prompt_key(t) for t in texts],
        os.path.join(workdir, embeddings.SUBDIR), mesh, _rules(config),
        max_sequence_length=wc.max_sequence_length, shard_size=wc.embed_shard_size,
        batch_size=wc.embed_batch_size, dtype=wc.dtype)
    if paths.is_writer():
        print(f"embeddings of {counts['prompts']} prompts in {workdir}/{embeddings.SUBDIR} "
              f"({counts['encoded']} encoded, {counts['skipped']} already there); train with "
              f"--config.world.embeddings={workdir}")
    return counts


def _sample_prompts(config: ml_collections.ConfigDict) -> list[str]:
    """`config.sample.prompts` and the prompts of `config.sample.prompt_file`, if any."""
    sample = config.get("sample")
    if not sample:
        return []
    texts = [str(p) for p in (sample.get("prompts") or [])]
    if sample.get("prompt_file"):
        texts += data.read_prompts(sample.prompt_file)
    return texts


# ----------------------------------------------------------------------------- the world


def _cast_tree(tree: Params, dtype: str) -> Params:
    target = jnp.bfloat16 if dtype in ("bfloat16", "bf16") else jnp.float32
    return jax.tree.map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, tree)


def _result_knobs(wc: ml_collections.ConfigDict) -> dict[str, Any]:
    """The world knobs that change training results (not paths, remat or eval sizes)."""
    keep = ("max_sequence_length", "height", "width", "num_steps", "guidance", "dtype",
            "param_dtype", "frozen_dtype", "reward", "reward_dtype", "test_fraction")
    return {k: wc[k] for k in keep}


def build(config: ml_collections.ConfigDict) -> World:
    """The flux world of `config` (weights streamed onto the mesh of `config.mesh`)."""
    wc = config.world
    src = sources(wc)
    folder = src.checkpoint
    mesh, rules = parallel.make_mesh(config.mesh.shape), _rules(config)
    train_set, test_set = prompt_sets(wc, src)
    extra = _sample_prompts(config) if config.task == "sample" else []

    # Conditioning first (cheap checks before any weight is read): stored embeddings, with
    # which the text encoders are never loaded, or live encoders.
    store = encoders = None
    if wc.embeddings:
        head = read_flux_config(os.path.join(folder, "transformer"))
        store = embeddings.open_embeddings(wc.embeddings, folder, wc.max_sequence_length,
                                           (head.context_in_dim, head.vec_in_dim))
        needed = list(train_set.keys) + list(test_set.keys)
        missing = store.missing(needed + [data.prompt_key(t) for t in extra])
        if missing:
            raise ValueError(f"{store.index_file}: {len(missing)} of the prompts are not "
                             f"embedded (e.g. {missing[0]}); run --config.task=embed again "
                             "with this config (it resumes), or drop --config.world.embeddings")
        encoder_id = store.fingerprint
    else:
        encoders = embeddings.load_text_encoders(
            folder, mesh, rules, max_sequence_length=wc.max_sequence_length, dtype=wc.dtype,
            param_dtype=wc.frozen_dtype)
        encoder_id = embeddings.encoder_fingerprint(folder, wc.max_sequence_length)

    generator = flux_pipeline.load_flux_pipeline(
        folder, wc.dtype, components=("transformer",), param_dtype=wc.param_dtype, mesh=mesh,
        rules=rules)
    vae = flux_pipeline.load_flux_pipeline(
        folder, wc.dtype, components=("vae",), param_dtype=wc.frozen_dtype, mesh=mesh,
        rules=rules)
    fcfg = dataclasses.replace(generator.transformer, remat=wc.remat)
    vcfg = dataclasses.replace(vae.vae, remat=wc.vae_remat)

    options = {"dtype": wc.reward_dtype, "remat": wc.reward_remat}
    if wc.reward_tokenizer:
        options["tokenizer"] = wc.reward_tokenizer
    if not src.reward_checkpoint:
        raise ValueError(f"config.world.reward_checkpoint is empty; set it to the "
                         f"{wc.reward} checkpoint (e.g. an HF CLIP folder for clip_score)")
    reward = rewards.load_reward(wc.reward, src.reward_checkpoint, **options)

    def condition(prompts: data.PromptSet, ids: np.ndarray, rows: np.ndarray | None
                  ) -> dict[str, np.ndarray]:
        """T5 + CLIP conditioning of prompts `ids[rows]` (every process passes the same
        global `ids`; live encoding runs on the whole mesh, then keeps `rows`)."""
        local = ids if rows is None else ids[np.asarray(rows)]
        if store is not None:
            return store([prompts.keys[int(i)] for i in local])
        cond = encoders(prompts.lookup(ids))
        return cond if rows is None else jax.tree.map(lambda x: x[np.asarray(rows)], cond)

    def batch_of(prompts: data.PromptSet, ids: np.ndarray, rows: np.ndarray | None = None
                 ) -> Batch:
        local = ids if rows is None else ids[np.asarray(rows)]
        return {"cond": condition(prompts, ids, rows),
                "reward_text": np.asarray(reward.encode_text(prompts.lookup(local)), np.float32),
                "prompt_id": np.asarray(local, np.int32)}

    stream = data.PromptStream(train_set, config.train.batch_size, config.seed,
                               sharding=parallel.batch_sharding(mesh))

    def train_batch(step: int, rows: np.ndarray | None = None) -> Batch:
        """Step `step`'s batch (or this process's `rows` of it): PromptStream order."""
        return batch_of(train_set, stream.global_ids(step), rows)

    latent_hw = vae.latent_hw(wc.height, wc.width)
    seq = (latent_hw[0] // 2) * (latent_hw[1] // 2)
    img_ids = flow.image_ids(latent_hw[0] // 2, latent_hw[1] // 2)
    timesteps = generator.scheduler.num_train_timesteps

    model = Flux(fcfg)

    def velocity(params: Params, x: jax.Array, sigma: jax.Array, cond: Any) -> jax.Array:
        """The transformer as FluxPipeline calls it: t = sigma * T / 1000, zero text ids,
        the distilled guidance for models that embed it."""
        b = x.shape[0]
        t = sigma.astype(jnp.float32) * (timesteps / 1000.0)
        guidance = jnp.full((b,), wc.guidance, jnp.float32) if fcfg.guidance_embed else None
        return model.apply({"params": params}, x, jnp.broadcast_to(img_ids, (b,) + img_ids.shape),
                           cond["txt"], jnp.zeros((b, cond["txt"].shape[1], 3), jnp.float32),
                           t, cond["y"], guidance)

    def decode(frozen: Params, x: jax.Array) -> jax.Array:
        return flux_pipeline.decode_latents(vcfg, frozen["vae"], x, latent_hw)

    def reward_fn(frozen: Params, images: jax.Array, batch: Batch) -> jax.Array:
        return reward.score(frozen["reward"], images, batch["reward_text"])

    pipe = Pipeline(velocity=velocity, decode=decode, reward=reward_fn,
                    sigmas=generator.scheduler.sigmas(wc.num_steps, seq),
                    latent_shape=(seq, fcfg.in_channels))
    reward_params = reward.params
    if wc.frozen_dtype in ("bfloat16", "bf16"):
        reward_params = _cast_tree(reward_params, wc.frozen_dtype)
    frozen = {"vae": vae.params["vae"], "reward": reward_params}

    if extra:  # task=sample with its own prompts: they make the grid
        grid_set = data.PromptSet(tuple(dict.fromkeys(extra)), "config.sample")
    else:
        grid_set = test_set
    grid_ids = np.arange(min(wc.num_grid_prompts, len(grid_set)) if not extra
                         else len(grid_set))
    eval_batch = batch_of(grid_set, grid_ids)

    eval_sigmas = generator.scheduler.sigmas(wc.eval_steps, seq)

    def evaluate_fn(params: Params, out_dir: str) -> dict[str, Any]:
        return evaluate_heldout(pipe, params, frozen, test_set, batch_of, wc, eval_sigmas,
                                out_dir, mesh, config.seed)

    identity = {"world": "flux",
                "transformer": embeddings.file_identity(os.path.join(folder, "transformer")),
                "vae": embeddings.file_identity(os.path.join(folder, "vae")),
                "encoders": encoder_id,
                "reward": {"name": wc.reward,
                           "checkpoint": embeddings.file_identity(src.reward_checkpoint)},
                "prompts": hashlib.sha256("\n".join(train_set.keys).encode()).hexdigest()[:16],
                "knobs": _result_knobs(wc)}
    return World(pipe=pipe, params=generator.params["transformer"],
                 param_axes=abstract_params(fcfg), frozen=frozen, train_batch=train_batch,
                 eval_batch=eval_batch, fingerprint=identity, evaluate=evaluate_fn,
                 eval_prompts=list(grid_set.lookup(grid_ids)))


def evaluate_heldout(pipe: Pipeline, params: Params, frozen: Params, prompts: data.PromptSet,
                     batch_of: Callable[..., Batch], wc: ml_collections.ConfigDict,
                     sigmas: np.ndarray, out_dir: str, mesh: jax.sharding.Mesh,
                     seed: int) -> dict[str, Any]:
    """`images_per_prompt` images of each held-out prompt (the first `num_eval_prompts`),
    sampled with `sigmas` from the same noise for every model; writes the eval folder
    (images, prompts.jsonl with each image's reward, results.json with the mean reward
    and its standard error over images)."""
    count = len(prompts) if not wc.num_eval_prompts else min(wc.num_eval_prompts, len(prompts))
    specs = [(p, j) for p in range(count) for j in range(wc.images_per_prompt)]
    sample = sampling.make_sample_fn(pipe, sigmas)
    score = jax.jit(pipe.reward)

    def sample_and_score(params, frozen, batch, rng):
        images = sample(params, frozen, batch, rng)
        return images, score(frozen, images, batch)

    base = jax.random.key(seed + 1000)  # the same noise for every model evaluated
    images, scores = [], []
    for start in range(0, len(specs), wc.eval_batch_size):
        ids = np.asarray([p for p, _ in specs[start:start + wc.eval_batch_size]])
        imgs, r = sampling.on_mesh(sample_and_score, mesh, params, frozen,
                                   batch_of(prompts, ids), jax.random.fold_in(base, start))
        images.append(sampling.to_uint8(imgs))  # a quarter of float32's host memory
        scores.append(np.asarray(r, np.float64))
    images, scores = np.concatenate(images), np.concatenate(scores)
    n = len(scores)
    results = {"reward": float(scores.mean()), "reward_std": float(scores.std()),
               "reward_sem": float(scores.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
               "num_images": n, "num_prompts": count, "eval_steps": len(sigmas) - 1,
               "reward_name": wc.reward}
    records = [{"prompt": prompts.texts[p], "prompt_key": prompts.keys[p], "sample": j,
                "reward": float(s)} for (p, j), s in zip(specs, scores)]
    evaluate.write_eval(out_dir, (im.astype(np.float32) / 255.0 for im in images), records,
                        results)
    return results
