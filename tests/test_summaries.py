"""TensorBoard event files without TensorFlow, read back by TensorBoard's own reader."""

import io
import os
import subprocess
import sys

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from leapalign_jax import paths, summaries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(logdir):
    events = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def test_scalars_image_and_hparams_read_back_by_tensorboard(tmp_path):
    writer = summaries.SummaryWriter(str(tmp_path))
    writer.write_hparams({"optim.learning_rate": 3e-5, "method.name": "leapalign",
                          "train.steps": 100, "lora.enabled": False})
    for step in (1, 2, 3):
        writer.write_scalars(step, {"loss": 1.0 / step, "reward_mean": 0.25 * step})
    grid = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    writer.write_image(3, "samples", grid)
    assert not list(tmp_path.iterdir())  # nothing written before a flush (FLUSH_SECS)
    writer.close()

    (event_file,) = os.listdir(tmp_path)
    assert event_file.startswith("events.out.tfevents.")
    events = read(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.5),
                                                                  (3, np.float32(1 / 3))]
    assert [e.value for e in events.Scalars("reward_mean")] == [0.25, 0.5, 0.75]
    (image,) = events.Images("samples")
    assert (image.step, image.height, image.width) == (3, 6, 10)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))),
                                  grid)
    assert "_hparams_/session_start_info" in events.Tags()["tensors"]
    # A second writer (a resumed run) appends a file of its own beside the first.
    again = summaries.SummaryWriter(str(tmp_path))
    again.write_scalars(4, {"loss": 0.2})
    again.close()
    assert [e.step for e in read(tmp_path).Scalars("loss")] == [1, 2, 3, 4]


def test_a_buckets_event_file_is_rewritten_whole_then_rolled(tmp_path, monkeypatch):
    """Objects cannot be appended to: each flush rewrites the file, and past ROLL_BYTES the
    next flush starts a new part; TensorBoard reads the parts as one run."""
    monkeypatch.setattr(paths, "is_remote", lambda p: True)
    monkeypatch.setattr(summaries, "ROLL_BYTES", 300)
    writer = summaries.SummaryWriter(str(tmp_path))
    sizes = []
    for step in range(1, 9):
        writer.write_scalars(step, {"loss": float(step), "reward_mean": -float(step)})
        writer.flush()
        sizes.append({f: os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path)})
    assert len(sizes[-1]) >= 2 and all(size < 600 for size in sizes[-1].values()), sizes
    first = min(sizes[0])
    assert sizes[1][first] > sizes[0][first]  # rewritten with the new record after the old
    assert [e.step for e in read(tmp_path).Scalars("loss")] == list(range(1, 9))


def test_other_hosts_only_log_and_nothing_imports_tensorflow(tmp_path):
    off = summaries.SummaryWriter(str(tmp_path / "off"), enabled=False)
    off.write_scalars(1, {"loss": 1.0})
    off.close()
    assert not (tmp_path / "off").exists()
    script = ("import sys; from leapalign_jax import summaries, train; "
              "w = summaries.SummaryWriter(sys.argv[1]); w.write_scalars(1, {'loss': 1.0}); "
              "w.close(); print('tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
