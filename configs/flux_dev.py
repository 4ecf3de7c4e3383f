"""LeapAlign on FLUX.1-dev: the paper's setting (720x720, 25 steps, guidance 3.5, batch 64,
AdamW 1e-5, EMA 0.995, 300 iterations, full fine-tune of the transformer).

    python -m leapalign_jax.main --config configs/flux_dev.py --workdir runs/dev \
        --config.world.checkpoint=/data/FLUX.1-dev \
        --config.world.prompt_file=/data/hpdv2_prompts \
        --config.world.reward_checkpoint=/data/clip-vit-large-patch14

Prompt embeddings once, then training without T5 / CLIP in memory:

    python -m leapalign_jax.main --config configs/flux_dev.py --workdir runs/emb \
        --config.task=embed --config.world.checkpoint=... --config.world.prompt_file=...
    python -m leapalign_jax.main --config configs/flux_dev.py --workdir runs/dev \
        --config.world.embeddings=runs/emb ...

Samples of the latest EMA params for prompts of your own:

    python -m leapalign_jax.main --config configs/flux_dev.py --workdir runs/dev \
        --config.task=sample --config.sample.prompt_file=my_prompts.txt ...

The variant after ':' is a comma-separated list: a method name picks another method on the
same world and budget (`configs/flux_dev.py:refl`); "tiny" writes a tiny random FLUX.1
folder, CLIP reward and prompts into `world.cache_dir` and runs everything through the real
loaders on CPU in about a minute (`configs/flux_dev.py:tiny`).
"""

import ml_collections

from leapalign_jax.config_lib import base_config
from leapalign_jax.flux_world import flux_config


def get_config(variant: str | None = None):
    parts = [p for p in (variant or "").split(",") if p]
    methods = [p for p in parts if p != "tiny"]
    config = base_config(methods[0] if methods else "leapalign")
    config.world = flux_config()
    # Paper (FLUX.1-dev, HPSv2.1): alpha 0.3, lambda 0.55, tau 0.1 are the method defaults.
    # With the clip_score stand-in (a cosine around 0.2-0.35) the hinge is always on.
    config.optim.learning_rate = 1e-5
    config.optim.weight_decay = 1e-4
    config.optim.ema_decay = 0.995
    config.train.steps = 300
    config.train.batch_size = 64
    config.train.log_every = 1
    config.train.image_every = 50
    config.train.checkpoint_every = 25
    config.train.eval_every = 100
    # task=sample: prompts of your own (a list, and/or a prompt file); none = the held-out
    # grid prompts. They need the text encoders (or embeddings that include them).
    config.sample = ml_collections.ConfigDict()
    config.sample.prompts = ml_collections.config_dict.placeholder(tuple)
    config.sample.prompt_file = ""
    return tiny(config) if "tiny" in parts else config


def tiny(config):
    """A CPU smoke run through every real loader: tiny random folders, tiny images."""
    w = config.world
    w.tiny = True
    w.height = w.width = 16  # the tiny VAE halves each side: 8x8 latents, 16 tokens
    w.max_sequence_length = 16
    w.num_steps = w.eval_steps = 4
    w.dtype = "float32"
    w.reward_dtype = "float32"
    w.remat = w.vae_remat = w.reward_remat = "none"
    w.images_per_prompt = 2
    w.num_eval_prompts = 2
    w.eval_batch_size = 4
    w.num_grid_prompts = 4
    w.embed_batch_size = 4
    w.embed_shard_size = 4
    config.method.hinge_lambda = 1.0
    config.optim.learning_rate = 1e-3
    config.optim.ema_decay = 0.9
    config.train.steps = 2
    config.train.batch_size = 4
    config.train.log_every = 1
    config.train.image_every = 2
    config.train.checkpoint_every = 2
    config.train.eval_every = 0
    return config
