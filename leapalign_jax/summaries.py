"""TensorBoard event files written without TensorFlow: scalars, images, hyperparameters.

TensorFlow's summary writer (behind clu's) costs about 4 s of imports at every start and a
500 MB install, and writes through TensorFlow's own file system. This writer frames the
same `Event` protos (tensorboard's, which need no TensorFlow) and writes them through
`paths`, so a gs:// workdir takes the code path of every other file of a run: a local event
file is appended to; a bucket object cannot be, so it is rewritten whole at each flush and
a new one is started once it passes ROLL_BYTES. Scalars are logged (INFO) as well, so the
log file holds them on every host.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import time
from typing import Any, Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.record_writer import RecordWriter

from leapalign_jax import paths

FLUSH_SECS = 30.0  # what TensorBoard shows lags the run by at most this much
ROLL_BYTES = 16 * 2 ** 20  # a bucket's event file is rewritten whole: bound what it holds


class SummaryWriter:
    """Writes one run's event file into `logdir`; with `enabled=False` (every host but
    process 0) it only logs the scalars."""

    def __init__(self, logdir: str, enabled: bool = True):
        self.logdir, self.enabled = logdir, enabled
        self._name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
                      f".{os.getpid()}")
        self._part, self._records, self._written = 0, io.BytesIO(), b""
        self._last_flush = time.monotonic()
        self._add(event_pb2.Event(file_version="brain.Event:2"))

    @property
    def path(self) -> str:
        """The event file being written (a bucket's later parts end in .1, .2, ...)."""
        return paths.join(self.logdir, self._name + (f".{self._part}" if self._part else ""))

    def _add(self, event: event_pb2.Event) -> None:
        if not self.enabled:
            return
        event.wall_time = event.wall_time or time.time()
        RecordWriter(self._records).write(event.SerializeToString())
        if time.monotonic() - self._last_flush > FLUSH_SECS:
            self.flush()

    def _add_summary(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        self._add(event_pb2.Event(step=step, summary=summary_pb2.Summary(value=values)))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}"
                                                 for k, v in sorted(scalars.items())))
        self._add_summary(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                 for k, v in scalars.items()])

    def write_image(self, step: int, tag: str, image: Any) -> None:
        """One (H, W, 3) uint8 image."""
        from PIL import Image

        image = np.asarray(image)
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        encoded = summary_pb2.Summary.Image(height=image.shape[0], width=image.shape[1],
                                            colorspace=image.shape[2],
                                            encoded_image_string=png.getvalue())
        self._add_summary(step, [summary_pb2.Summary.Value(tag=tag, image=encoded)])

    def write_hparams(self, hparams: Mapping[str, bool | int | float | str]) -> None:
        """The run's knobs for TensorBoard's HParams tab."""
        self._add(event_pb2.Event(summary=hparams_summary.hparams_pb(dict(hparams))))

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        data = self._records.getvalue()
        if not data:
            return
        self._records = io.BytesIO()
        if paths.is_remote(self.logdir):
            self._written += data
            paths.write_bytes(self.path, self._written)
            if len(self._written) > ROLL_BYTES:  # the next flush starts the next part
                self._part, self._written = self._part + 1, b""
                self._add(event_pb2.Event(file_version="brain.Event:2"))
        else:
            paths.makedirs(self.logdir)
            with open(self.path, "ab") as f:
                f.write(data)

    def close(self) -> None:
        self.flush()
