"""Entry point: `python -m leapalign_jax.main --config configs/<file>.py --workdir DIR`.

Overrides go on the command line (`--config.method.alpha=0.1`); a config file may offer
variants (`--config configs/toy_leapalign.py:refl`). `config.task` picks the job.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")
flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")
FLAGS = flags.FLAGS


def run(config, workdir: str) -> None:
    """Validates `config` and runs `config.task` in `workdir`."""
    import jax

    from leapalign_jax import config_lib, parallel, train

    parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh(config.mesh.shape)
    config_lib.validate(config, parallel.data_parallel_size(mesh), config.world.num_steps)
    os.makedirs(workdir, exist_ok=True)
    logging.info("devices: %s; mesh %s", jax.devices(), dict(mesh.shape))
    if config.task == "train":
        train.train_and_report(config, workdir)
    elif config.task == "sample":
        train.sample_from_checkpoint(config, workdir)
    else:
        from leapalign_jax import evaluate
        evaluate.evaluate_checkpoint(config, workdir)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/toy_leapalign.py")
    workdir = FLAGS.workdir or os.path.join("runs", "default")
    if FLAGS.debug:
        return run(FLAGS.config, workdir)
    from leapalign_jax.config_lib import ConfigError
    from leapalign_jax.train import TrainingError
    try:
        run(FLAGS.config, workdir)
    except (ConfigError, TrainingError, ValueError, FileNotFoundError, KeyError) as e:
        message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        lines = message.strip().splitlines() or [type(e).__name__]
        more = f"; {len(lines) - 1} more line(s) with --debug" if len(lines) > 1 else ""
        print(f"error: {lines[0]} (rerun with --debug for details{more})", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
