"""A tiny random Flux with a "redness" reward: runs anywhere in seconds, needs no files.

    python -m leapalign_jax.main --config configs/random_flux.py --workdir runs/random
    python -m leapalign_jax.main --config configs/random_flux.py:refl ...   # another method

Used by the tests and as a smoke check of an installation or an accelerator mesh.
"""

from leapalign_jax.config_lib import base_config


def get_config(method: str | None = None):
    config = base_config(method or "leapalign")
    config.method.hinge_lambda = 1.0  # the redness reward lies in (-1, 1): hinge always on
    config.optim.learning_rate = 1e-3  # a random model moves visibly in a few steps
    config.optim.ema_decay = 0.9
    config.train.steps = 20
    config.train.batch_size = 8
    config.train.log_every = 5
    config.train.image_every = 10
    config.train.checkpoint_every = 10
    return config
