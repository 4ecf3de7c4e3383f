"""Entry point: `python -m leapalign_jax.main --config configs/<file>.py --workdir DIR`.

Overrides go on the command line (`--config.method.alpha=0.1`); a config file may offer
variants (`--config configs/toy_leapalign.py:refl`). `config.task` picks the job.
"""

from __future__ import annotations

import logging
import os
import re
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

    from leapalign_jax import config_lib, parallel, tasks

    parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh(config.mesh.shape)
    config_lib.validate(config, parallel.data_parallel_size(mesh), config.world.num_steps)
    os.makedirs(workdir, exist_ok=True)
    logging.info("devices: %s; mesh %s", jax.devices(), dict(mesh.shape))
    tasks.run(config, workdir)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config = FLAGS.config
        config and config.task  # noqa: B018 - a file that failed to load raises here
    except OSError as e:  # the config file is loaded lazily, on first access
        if FLAGS.debug:
            raise
        _fail(f"cannot load the config file: {str(e).strip().splitlines()[-1]}")
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/toy_leapalign.py")
    workdir = FLAGS.workdir or os.path.join("runs", "default")
    if FLAGS.debug:
        return run(config, workdir)
    from leapalign_jax.checkpoint import CheckpointError
    from leapalign_jax.config_lib import ConfigError
    from leapalign_jax.train import TrainingError
    try:
        run(config, workdir)
    except (ConfigError, CheckpointError, TrainingError, ValueError, FileNotFoundError,
            KeyError) as e:
        message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        _fail((message.strip().splitlines() or [type(e).__name__])[0])


def _fail(message: str) -> None:
    """One line on stderr, exit status 2: the boundary error style of the whole CLI."""
    print(f"error: {' '.join(message.split())} (rerun with --debug for details)",
          file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """Parses flags; a bad `--config.*` override is a one-line error, not a traceback."""
    try:
        return FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - absl and ml_collections raise many kinds
        if "--debug" in argv:
            raise
        cause = e.__cause__ or e.__context__ or e
        text = str(cause.args[0] if cause.args else cause).replace("\\n", "\n")
        lines = [line for line in text.splitlines() if line.strip()] or [type(e).__name__]
        _fail("bad --config: " + re.sub(r"[\\'\"]", " ", lines[-1]))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
