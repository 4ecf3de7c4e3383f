"""The "flux" world: align FLUX.1-dev's transformer on a prompt file with a differentiable
reward, as the paper does.

    python -m leapalign_jax.main --config configs/flux_dev.py --workdir runs/dev \
        --config.world.checkpoint=/data/FLUX.1-dev --config.world.prompt_file=prompts/ \
        --config.world.reward_checkpoint=/data/clip-vit-large-patch14

    python -m leapalign_jax.main --config configs/flux_dev.py:hpsv21 --workdir runs/hps \
        --config.world.checkpoint=/data/FLUX.1-dev --config.world.prompt_file=prompts/ \
        --config.world.judges.hpsv21.checkpoint=/data/HPS_v2.1_compressed.pt \
        --config.world.judges.hpsv21.tokenizer=/data/FLUX.1-dev/tokenizer \
        --config.world.judges.pickscore.checkpoint=/data/PickScore_v1 \
        --config.world.judges.pickscore.tokenizer=/data/CLIP-ViT-H-14-laion2B-s32B-b79K \
        --config.world.judges.clip_score.checkpoint=/data/clip-vit-large-patch14 \
        --config.world.judges.aesthetic.checkpoint=/data/sac+logos+ava1-l14-linearMSE.pth \
        --config.world.judges.aesthetic.backbone=/data/clip-vit-large-patch14

What the world holds:

- the transformer (trainable): streamed from `checkpoint/transformer/` straight onto its
  shards of the mesh (`weights.sharded`), float32 master params unless
  `world.param_dtype` says otherwise, computing in `world.dtype`;
- the VAE decoder (frozen, differentiable, `world.vae_remat`), also streamed onto the mesh;
- the training reward (frozen, differentiable): `world.reward`, one judge name or a
  weighted sum such as "hpsv21:1.0,pickscore:0.05" (`rewards.load_rewards`), each judge
  read from `world.judges.<name>` (`world.reward_checkpoint` / `reward_tokenizer` are a
  shorthand for a single judge); its text features are computed per prompt on the host
  side of the step and travel in the batch as `reward_text` ({name: (B, D)});
- the prompts: `data.load_split(world.prompt_file)`'s train split in `data.PromptStream`
  order (each process reads only its rows of the global batch), and the test split (or
  `world.test_prompt_file`) for evaluation and image grids;
- the conditioning: T5 + CLIP embeddings read from `world.embeddings` (computed once by
  `task=embed`, see `leapalign_jax.embeddings`), in which case the text encoders are never
  loaded, or encoded step by step by T5 (sharded on the mesh) and CLIP.

`evaluate` (task=evaluate, and the before/after evaluation of task=train) samples
`images_per_prompt` images per held-out prompt with `eval_steps` Euler steps (the paper: 4
images, 50 steps), scores every image with each judge of `world.eval_rewards` (the paper:
HPSv2.1, PickScore, CLIP score, aesthetic) and with the training reward, and writes
`images/*.png`, `prompts.jsonl` (prompt, image file, every score) and `results.json`
(each judge's mean and standard error over images), so the base and the aligned model get
the same columns. The judges are loaded for each evaluation and dropped after it, so they
take no device memory while training.

The `:tiny` variant of configs/flux_dev.py sets `world.tiny`: a tiny random FLUX.1 folder
in the real layout (`weights.flux_folder.write_tiny_flux_folder`), a tiny checkpoint of
every judge in its real layout (`weights.tiny_judges`, no torch) and a prompt folder are
written once into `world.cache_dir` and everything runs through the real loaders on CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from leapalign_jax import data, embeddings, evaluate, flow, flux_pipeline, parallel
from leapalign_jax import paths, rewards, sampling
from leapalign_jax.models.flux import Flux, abstract_params
from leapalign_jax.pipeline import Batch, Params, Pipeline, World
from leapalign_jax.pipeline import score as score_rewards
from leapalign_jax.rewards.combine import combine
from leapalign_jax.weights import flux_folder, tiny_judges
from leapalign_jax.weights.flux import read_flux_config

_log = logging.getLogger(__name__)


JUDGES = tuple(rewards.REWARDS)  # hpsv21, pickscore, clip_score, aesthetic
PAPER_JUDGES = ("hpsv21", "pickscore", "clip_score", "aesthetic")  # the paper's tables
_JUDGE_FILES = {"hpsv21": "HPS_v2.1_compressed.pt (OpenCLIP ViT-H-14)",
                "pickscore": "the PickScore_v1 folder (yuvalkirstain/PickScore_v1)",
                "clip_score": "a CLIPModel folder (openai/clip-vit-large-patch14)",
                "aesthetic": "sac+logos+ava1-l14-linearMSE.pth, with judges.aesthetic.backbone"
                             " the openai/clip-vit-large-patch14 folder"}


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
    # Transformer block remat: none | full | dots_saveable | offload. "full" because
    # FLUX.1-dev at 720x720, batch 4 per device, needs ~114 GiB per device with
    # dots_saveable and ~21 GiB with full (benchmarks/results/plan.md).
    c.remat = "full"
    # One nn.scan per block kind (models/flux.py FluxConfig.scan_blocks): XLA compiles one
    # double and one single block instead of 19 + 38 (both layouts' compile times:
    # benchmarks/results/scan_compile/). The loader streams into the stacked layout, LoRA
    # stacks its adapters, export unstacks; a run's checkpoints keep the layout it began with.
    c.scan_blocks = False
    c.vae_remat = "full"  # VAE decoder block remat (the decoder is differentiated)
    # The training reward: a judge name or a weighted sum "name:w,name:w" (e.g.
    # "hpsv21:1.0,pickscore:0.05"); each judge is read from judges.<name> below.
    c.reward = "clip_score"
    # Shorthand for a single-judge reward: fills judges.<reward>.checkpoint / .tokenizer
    # when those are empty (kept so `--config.world.reward_checkpoint=...` works).
    c.reward_checkpoint = ""
    c.reward_tokenizer = ""
    c.reward_dtype = "bfloat16"  # training reward compute dtype (params: frozen_dtype)
    c.reward_remat = "full"  # training reward vision tower remat
    # The judges' files, one entry per rewards.load_reward name:
    #   checkpoint: hpsv21: HPS_v2.1_compressed.pt (or a .safetensors with its keys);
    #     pickscore: the PickScore_v1 folder; clip_score: a CLIPModel folder
    #     (openai/clip-vit-large-patch14); aesthetic: sac+logos+ava1-l14-linearMSE.pth (or
    #     .safetensors).
    #   tokenizer: a CLIP tokenizer folder; "" = the checkpoint folder's own. Required for
    #     hpsv21 (FLUX.1's tokenizer/ serves) and for PickScore_v1, which ships none
    #     (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's). Not read by aesthetic.
    #   backbone: aesthetic only: the CLIP ViT-L/14 folder whose image embedding the head
    #     reads (openai/clip-vit-large-patch14).
    c.judges = ml_collections.ConfigDict()
    for name in JUDGES:
        c.judges[name] = ml_collections.ConfigDict(
            {"checkpoint": "", "tokenizer": "", "backbone": ""})
    # Evaluation judges, each reported with its mean and standard error: a comma-separated
    # string of judge names (the paper: "hpsv21,pickscore,clip_score,aesthetic"); "" = the
    # judges of the training reward. The training reward itself is
    # always reported too, as `reward`.
    c.eval_rewards = ""
    c.eval_dtype = "float32"  # compute and param dtype of the evaluation judges
    # Evaluation: images_per_prompt images for each of the first num_eval_prompts held-out
    # prompts (0 = all), sampled eval_batch_size at a time with eval_steps Euler steps;
    # grids show num_grid_prompts.
    c.images_per_prompt = 4
    c.num_eval_prompts = 0
    c.eval_batch_size = 16
    c.num_grid_prompts = 8
    c.embed_batch_size = 16  # task=embed: prompts per encoder call
    c.embed_shard_size = 128  # task=embed: prompts per embeddings file
    # True: write (once) a tiny random FLUX.1 folder, a tiny checkpoint of every judge and a
    # prompt folder into cache_dir and use them where checkpoint, prompt_file or a judge's
    # checkpoint are "".
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


def _write_tiny_judges(folder: str) -> None:
    """The tiny pickscore folder, hpsv21 and aesthetic files (their tokenizer / backbone is
    the tiny clip folder, whose vocabulary the hpsv21 text tower shares)."""
    os.makedirs(folder, exist_ok=True)
    tiny_judges.write_tiny_clip_folder(os.path.join(folder, "pickscore"), seed=2,
                                       hidden_act="gelu")
    vocab = flux_folder.write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    tiny_judges.write_tiny_openclip(os.path.join(folder, "hpsv21.safetensors"), vocab, seed=3)
    tiny_judges.write_tiny_aesthetic_head(os.path.join(folder, "aesthetic.safetensors"),
                                          width_in=8, seed=4)


@dataclasses.dataclass(frozen=True)
class Sources:
    """Where the world's files are: the FLUX.1 folder, the prompts and each judge's files
    (name -> {"checkpoint", "tokenizer", "backbone"}, "" where not given)."""

    checkpoint: str
    prompt_file: str
    judges: dict[str, dict[str, str]]


def train_weights(wc: ml_collections.ConfigDict) -> list[tuple[str, float]]:
    """The training reward's [(judge, weight)] from `world.reward`."""
    try:
        return rewards.reward_weights(wc.reward)
    except ValueError as err:
        raise ValueError(f"config.world.reward: {err}") from None


def eval_judges(wc: ml_collections.ConfigDict) -> list[str]:
    """The evaluation judges' names (`world.eval_rewards`; empty: the training reward's)."""
    spec = wc.eval_rewards
    names = ([n.strip() for n in spec.split(",")] if isinstance(spec, str)
             else [str(n).strip() for n in (spec or ())])
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        return [name for name, _ in train_weights(wc)]
    unknown = [n for n in names if n not in JUDGES]
    if unknown:
        raise ValueError(f"config.world.eval_rewards: unknown judge {unknown[0]!r}; use a "
                         f"comma-separated list of {', '.join(JUDGES)}")
    return names


def _judge_files(wc: ml_collections.ConfigDict) -> dict[str, dict[str, str]]:
    """`world.judges` as plain dicts, with the reward_checkpoint / reward_tokenizer
    shorthand filled in for a single-judge training reward."""
    judges = {name: {k: str(wc.judges[name].get(k) or "")
                     for k in ("checkpoint", "tokenizer", "backbone")} for name in JUDGES}
    weights = train_weights(wc)
    for knob, field in (("reward_checkpoint", "checkpoint"), ("reward_tokenizer", "tokenizer")):
        if not wc[knob]:
            continue
        if len(weights) != 1:
            raise ValueError(f"config.world.{knob} names one file but config.world.reward="
                             f"{wc.reward!r} has {len(weights)} judges; set "
                             f"config.world.judges.<name>.{field} for each instead")
        entry = judges[weights[0][0]]
        if entry[field] and entry[field] != wc[knob]:
            raise ValueError(f"config.world.{knob}={wc[knob]!r} and config.world.judges."
                             f"{weights[0][0]}.{field}={entry[field]!r} differ; set only one")
        entry[field] = wc[knob]
    return judges


def sources(wc: ml_collections.ConfigDict) -> Sources:
    """The configured paths; with `tiny`, the tiny folders (written once) fill the blanks."""
    checkpoint_, prompts = wc.checkpoint, wc.prompt_file
    judges = _judge_files(wc)
    if wc.tiny:
        root = os.path.abspath(wc.cache_dir)
        os.makedirs(root, exist_ok=True)
        if not checkpoint_:
            checkpoint_ = os.path.join(root, "flux")
            _write_once(checkpoint_, lambda p: flux_folder.write_tiny_flux_folder(p, seed=0))
        if not prompts:
            prompts = os.path.join(root, "prompts")
            _write_once(prompts, _write_prompts)
        clip, extra = os.path.join(root, "clip"), os.path.join(root, "judges")
        tiny = {"clip_score": {"checkpoint": clip},
                "pickscore": {"checkpoint": os.path.join(extra, "pickscore")},
                "hpsv21": {"checkpoint": os.path.join(extra, "hpsv21.safetensors"),
                           "tokenizer": os.path.join(extra, "tokenizer")},
                "aesthetic": {"checkpoint": os.path.join(extra, "aesthetic.safetensors"),
                              "backbone": clip}}
        for name, files in tiny.items():
            if not judges[name]["checkpoint"]:  # a tiny judge comes with its tiny helpers
                judges[name] |= files
        _write_once(clip, lambda p: tiny_judges.write_tiny_clip_folder(p, seed=1))
        _write_once(extra, _write_tiny_judges)
    for value, knob, what in ((checkpoint_, "checkpoint", "a FLUX.1 folder in diffusers "
                               "layout (model_index.json, transformer/, vae/, ...)"),
                              (prompts, "prompt_file", "a prompt file or a folder with "
                               "train.txt and test.txt")):
        if not value:
            raise ValueError(f"config.world.{knob} is empty; set --config.world.{knob}= {what}"
                             " (or use configs/flux_dev.py:tiny)")
    return Sources(checkpoint_, prompts, judges)


def _check_judges(wc: ml_collections.ConfigDict, src: Sources, names: list[str]) -> None:
    """Judges `names` have their checkpoint (and the aesthetic one its backbone)
    configured and present: one-line errors before any weight is read."""
    trained = [n for n, _ in train_weights(wc)]
    for name in dict.fromkeys(names):
        files = src.judges[name]
        if not files["checkpoint"]:
            knob = (f"reward_checkpoint (or judges.{name}.checkpoint)" if [name] == trained
                    else f"judges.{name}.checkpoint")
            raise ValueError(f"config.world.{knob} is empty; set it to {_JUDGE_FILES[name]}")
        if not os.path.exists(files["checkpoint"]):
            raise FileNotFoundError(f"{files['checkpoint']}: the {name} judge's checkpoint "
                                    f"(config.world.judges.{name}.checkpoint) is not there; "
                                    f"download {_JUDGE_FILES[name]}")
        if name == "aesthetic" and not files["backbone"]:
            raise ValueError("config.world.judges.aesthetic.backbone is empty; set it to the "
                             "openai/clip-vit-large-patch14 folder")


def load_judge(name: str, files: dict[str, str], *, dtype: str, remat: str
               ) -> rewards.Reward:
    """The judge `name` from its files (`Sources.judges[name]`), computing in `dtype`."""
    options: dict[str, Any] = {"dtype": dtype, "remat": remat}
    if files.get("tokenizer") and name != "aesthetic":
        options["tokenizer"] = files["tokenizer"]
    if name == "aesthetic":
        options["backbone"] = files.get("backbone") or None
    return rewards.load_reward(name, files["checkpoint"], **options)


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
    weights = train_weights(wc)
    judge_names = eval_judges(wc) if config.task in ("train", "evaluate") else []
    _check_judges(wc, src, [n for n, _ in weights] + judge_names)

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
        rules=rules, scan_blocks=bool(wc.get("scan_blocks")))
    vae = flux_pipeline.load_flux_pipeline(
        folder, wc.dtype, components=("vae",), param_dtype=wc.frozen_dtype, mesh=mesh,
        rules=rules)
    fcfg = dataclasses.replace(generator.transformer, remat=wc.remat)
    vcfg = dataclasses.replace(vae.vae, remat=wc.vae_remat)

    reward = combine(
        {name: load_judge(name, src.judges[name], dtype=wc.reward_dtype, remat=wc.reward_remat)
         for name, _ in weights}, weights)

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
                "reward_text": _features(reward.encode_text(prompts.lookup(local))),
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

    def reward_fn(frozen: Params, images: jax.Array, batch: Batch) -> Any:
        total, terms = reward.score(frozen["reward"], images, batch["reward_text"])
        # A weighted mix reports each judge's score too (reward_<name> in the metrics).
        return (total, terms) if len(terms) > 1 else total

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

    sample = sampling.make_sample_fn(pipe, eval_sigmas)  # compiled once for all evaluations

    def load_eval_judges() -> dict[str, rewards.Reward]:
        return {name: load_judge(name, src.judges[name], dtype=wc.eval_dtype, remat="none")
                for name in judge_names}

    def evaluate_fn(params: Params, out_dir: str) -> dict[str, Any]:
        return evaluate_heldout(pipe, sample, params, frozen, test_set, batch_of,
                                load_eval_judges(), wc, out_dir, mesh, config.seed)

    identity = {"world": "flux",
                "transformer": embeddings.file_identity(os.path.join(folder, "transformer")),
                "vae": embeddings.file_identity(os.path.join(folder, "vae")),
                "encoders": encoder_id,
                "reward": _reward_identity(weights, src),
                "prompts": hashlib.sha256("\n".join(train_set.keys).encode()).hexdigest()[:16],
                "knobs": _result_knobs(wc)}
    if fcfg.scan_blocks:  # stacked checkpoints cannot resume a per-block run, nor back
        identity["param_layout"] = "scan_blocks"
    return World(pipe=pipe, params=generator.params["transformer"],
                 param_axes=abstract_params(fcfg), frozen=frozen, train_batch=train_batch,
                 model=fcfg,
                 eval_batch=eval_batch, fingerprint=identity, evaluate=evaluate_fn,
                 eval_prompts=list(grid_set.lookup(grid_ids)))


def _features(features: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    """Per-judge text features as host float32; an image-only judge's (B, 0) features
    become (B, 1) zeros, which it ignores, so every leaf splits over the batch axis."""
    out = {}
    for name, f in features.items():
        f = np.asarray(f, np.float32)
        out[name] = f if f.shape[-1] else np.zeros(f.shape[:-1] + (1,), np.float32)
    return out


def _reward_identity(weights: list[tuple[str, float]], src: Sources) -> dict[str, Any]:
    """The training reward in the fingerprint: a single judge as {name, checkpoint}, a
    weighted sum as {name: spec, weights, checkpoints}."""
    ident = {name: embeddings.file_identity(src.judges[name]["checkpoint"])
             for name, _ in weights}
    if len(weights) == 1 and weights[0][1] == 1.0:
        return {"name": weights[0][0], "checkpoint": ident[weights[0][0]]}
    return {"name": ",".join(f"{n}:{w:g}" for n, w in weights), "weights": dict(weights),
            "checkpoints": ident}


def _mean_sem(values: np.ndarray) -> tuple[float, float]:
    """The mean and its standard error (sample std / sqrt(n); 0 for one value)."""
    n = len(values)
    sem = float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    return float(values.mean()), sem


def evaluate_heldout(pipe: Pipeline, sample: Callable[..., jax.Array], params: Params,
                     frozen: Params, prompts: data.PromptSet,
                     batch_of: Callable[..., Batch], judges: dict[str, rewards.Reward],
                     wc: ml_collections.ConfigDict, out_dir: str, mesh: jax.sharding.Mesh,
                     seed: int) -> dict[str, Any]:
    """`images_per_prompt` images of each held-out prompt (the first `num_eval_prompts`),
    sampled by `sample` (the evaluation schedule) from the same noise for every model,
    scored by the training reward and by every judge of `judges`.

    Writes the eval folder: images, prompts.jsonl (one line per image: file, prompt,
    sample index, `reward` and each judge's score under its name) and results.json:
    `reward` / `reward_sem` (the training reward) and `<judge>` / `<judge>_sem` (each
    judge's mean over images and its standard error), plus `judges` ({name: {mean, sem,
    std}}), the image and prompt counts and the step count.
    """
    count = len(prompts) if not wc.num_eval_prompts else min(wc.num_eval_prompts, len(prompts))
    specs = [(p, j) for p in range(count) for j in range(wc.images_per_prompt)]
    judge_params = {name: j.params for name, j in judges.items()}
    if wc.eval_dtype in ("bfloat16", "bf16"):
        judge_params = _cast_tree(judge_params, wc.eval_dtype)

    @jax.jit
    def score(frozen_all, images, batch):
        scores = {"reward": score_rewards(pipe, frozen_all["frozen"], images, batch)[0]}
        for name, judge in judges.items():
            scores[name] = judge.score(frozen_all["judges"][name], images,
                                       batch["judge_text"][name])
        return scores

    def sample_and_score(params, frozen_all, batch, rng):
        images = sample(params, frozen_all["frozen"], batch, rng)
        return images, score(frozen_all, images, batch)

    base = jax.random.key(seed + 1000)  # the same noise for every model evaluated
    frozen_all = {"frozen": frozen, "judges": judge_params}
    images, parts = [], []
    for start in range(0, len(specs), wc.eval_batch_size):
        ids = np.asarray([p for p, _ in specs[start:start + wc.eval_batch_size]])
        batch = batch_of(prompts, ids)
        texts = prompts.lookup(ids)
        batch["judge_text"] = _features({name: j.encode_text(texts)
                                         for name, j in judges.items()})
        imgs, s = sampling.on_mesh(sample_and_score, mesh, params, frozen_all, batch,
                                   jax.random.fold_in(base, start))
        images.append(sampling.to_uint8(imgs))  # a quarter of float32's host memory
        parts.append({k: np.asarray(v, np.float64) for k, v in s.items()})
    images = np.concatenate(images)
    scores = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    n = len(specs)
    results: dict[str, Any] = {"num_images": n, "num_prompts": count,
                               "eval_steps": wc.eval_steps,
                               "reward_name": wc.reward, "judges": {}}
    results["reward"], results["reward_sem"] = _mean_sem(scores["reward"])
    for name in judges:
        mean, sem = _mean_sem(scores[name])
        results[name], results[f"{name}_sem"] = mean, sem
        results["judges"][name] = {"mean": mean, "sem": sem, "std": float(scores[name].std())}
    records = [{"prompt": prompts.texts[p], "prompt_key": prompts.keys[p], "sample": j,
                **{k: float(v[i]) for k, v in scores.items()}}
               for i, (p, j) in enumerate(specs)]
    evaluate.write_eval(out_dir, (im.astype(np.float32) / 255.0 for im in images), records,
                        results)
    return results
