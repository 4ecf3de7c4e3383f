"""Entry point: `python -m leapalign_jax.main --config configs/<file>.py --workdir DIR`.

Overrides go on the command line (`--config.method.alpha=0.1`); a config file may offer
variants (`--config configs/toy_leapalign.py:refl`). `config.task` picks the job. The
workdir may be local or `gs://bucket/dir` (see leapalign_jax/paths.py).

The console shows the progress bar, one line per evaluation, warnings and the final table;
the libraries' INFO logging (absl, orbax, jax) goes to `DIR/log.txt`
(`DIR/log-<i>.txt` for process i > 0 of a pod). `--verbose` shows it on the console too.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import time

if "--verbose" not in sys.argv:  # XLA's C++ INFO lines, read at library load
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images.")
flags.DEFINE_bool("debug", False, "Show full tracebacks instead of one-line errors.")
flags.DEFINE_bool("verbose", False, "Also show the libraries' INFO logging on the console.")
FLAGS = flags.FLAGS


def run(config, workdir: str, verbose: bool = False) -> None:
    """Validates `config` and runs `config.task` in `workdir`."""
    console_level(verbose)  # before jax starts its backends, which log at INFO
    import jax

    from leapalign_jax import config_lib, parallel, paths, tasks

    parallel.maybe_initialize_distributed()
    mesh = parallel.make_mesh(config.mesh.shape)
    config_lib.validate(config, parallel.data_parallel_size(mesh), config.world.num_steps)
    paths.makedirs(workdir)
    index = jax.process_index()
    log_file = paths.join(workdir, "log.txt" if index == 0 else f"log-{index}.txt")
    handler = setup_logging(log_file, verbose)
    try:
        logging.info("devices: %s; mesh %s", jax.devices(), dict(mesh.shape))
        tasks.run(config, workdir)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


class _BucketLogHandler(logging.FileHandler):
    """Logs to a local temporary file and copies it whole to `remote` (a bucket object,
    which cannot be appended to) every `every` seconds and on close."""

    def __init__(self, remote: str, every: float = 60.0):
        from leapalign_jax import paths

        fd, local = tempfile.mkstemp(prefix="leapalign-", suffix=".log")
        with os.fdopen(fd, "wb") as f:
            if paths.exists(remote):  # a resumed run continues the same log
                f.write(paths.read_bytes(remote))
        super().__init__(local, mode="a", encoding="utf-8")
        self.remote, self.every, self.last = remote, every, time.monotonic()
        self._uploading = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if time.monotonic() - self.last > self.every:
            self.upload()

    def upload(self) -> None:
        if not self._uploading.acquire(blocking=False):  # the upload itself logged
            return
        try:
            from leapalign_jax import paths

            self.flush()
            self.last = time.monotonic()
            with open(self.baseFilename, "rb") as f:
                paths.write_bytes(self.remote, f.read())
        except Exception as e:  # noqa: BLE001 - a log copy must never stop a run
            print(f"warning: could not copy the log to {self.remote}: {e}", file=sys.stderr)
        finally:
            self._uploading.release()

    def close(self) -> None:
        if self.stream is not None:
            self.upload()
        local = self.baseFilename
        super().close()
        if os.path.exists(local):
            os.remove(local)


def setup_logging(log_file: str, verbose: bool = False) -> logging.Handler:
    """INFO logging of every library to `log_file` (local or gs://); the console keeps
    warnings only, unless `verbose`. Returns the file handler."""
    from absl import logging as absl_logging

    from leapalign_jax import paths

    if paths.is_remote(log_file):
        handler: logging.Handler = _BucketLogHandler(log_file)
    else:
        handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    console_level(verbose)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.INFO)
    return handler


def console_level(verbose: bool) -> None:
    """The console handlers (absl's on stderr) show warnings only, unless `verbose`."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, (logging.FileHandler, _BucketLogHandler)):
            handler.setLevel(logging.INFO if verbose else logging.WARNING)


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
        return run(config, workdir, FLAGS.verbose)
    from leapalign_jax.checkpoint import CheckpointError
    from leapalign_jax.config_lib import ConfigError
    from leapalign_jax.train import TrainingError
    try:
        run(config, workdir, FLAGS.verbose)
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
