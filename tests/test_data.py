"""Prompt sets: readers, splits, stable ids, the (seed, step) order, per-host slices, 2 hosts."""

import dataclasses
import json
import os
import types

import jax
import numpy as np
import pytest

from leapalign_jax import data, parallel
from tests import multihost

HERE = os.path.dirname(os.path.abspath(__file__))


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- readers


def test_formats_load(tmp_path):
    want = ["a red cube", "two blue spheres", "a cat, on a mat"]
    txt = write(tmp_path / "p.txt", "# header\n\na red cube\n  two blue spheres  \n"
                "# comment\na cat, on a mat\n\n")
    jsonl = write(tmp_path / "p.jsonl", "".join(json.dumps({"prompt": p, "tag": i}) + "\n\n"
                                                 for i, p in enumerate(want)))
    strings = write(tmp_path / "anime.json", json.dumps(want))  # HPDv2 benchmark prompts
    objects = write(tmp_path / "train.json", json.dumps(  # HPDv2 train.json items
        [{"prompt": p, "image_path": ["x.png"], "human_preference": [1]} for p in want]))
    sniffed = write(tmp_path / "prompts", json.dumps(want))  # no suffix: detected by "["
    for path in (txt, jsonl, strings, objects, sniffed):
        assert data.read_prompts(path) == want, path
    assert data.read_prompts(txt, format="text") == want
    # A format given explicitly wins over the suffix: the .txt is read as JSON lines.
    assert data.read_prompts(write(tmp_path / "j.txt", '{"prompt": "x"}\n'),
                             format="jsonl") == ["x"]

    folder = tmp_path / "pickscore"  # Flow-GRPO layout: train.txt and test.txt
    folder.mkdir()
    write(folder / "train.txt", "a\nb\na\nc\n")
    write(folder / "test.txt", "d\ne\n")
    train, test = data.load_split(folder, "train"), data.load_split(folder, "test")
    assert train.texts == ("a", "b", "c") and test.texts == ("d", "e")  # repeats kept once
    assert train.source.endswith("train.txt")
    explicit = data.load_split(txt, "test", test_path=folder / "test.txt")
    assert explicit.texts == ("d", "e") and data.load_split(txt, test_path=jsonl).texts == \
        tuple(want)


def test_ids_stable_under_appending(tmp_path):
    path = write(tmp_path / "p.txt", "".join(f"prompt {i}\n" for i in range(50)))
    before = {s: data.load_split(path, s, test_fraction=0.3) for s in data.SPLITS}
    with open(path, "a", encoding="utf-8") as f:
        f.write("prompt 3\n# note\n" + "".join(f"new prompt {i}\n" for i in range(30)))
    after = {s: data.load_split(path, s, test_fraction=0.3) for s in data.SPLITS}
    for s in data.SPLITS:
        n = len(before[s])
        assert after[s].texts[:n] == before[s].texts  # every old id names the same prompt
        assert after[s].keys[:n] == before[s].keys
        assert len(after[s]) > n
    whole = data.load_split(path)
    assert len(whole) == 80 and whole.texts[3] == "prompt 3"  # the repeat is dropped
    assert whole.keys[3] == data.prompt_key("prompt 3") and len(set(whole.keys)) == 80
    assert whole.lookup(np.array([[3], [50]])) == ["prompt 3", "new prompt 0"]


def test_hash_split_disjoint_and_stable(tmp_path):
    prompts = [f"scene {i} with {i % 5} objects" for i in range(400)]
    path = write(tmp_path / "p.txt", "\n".join(prompts))
    train = data.load_split(path, "train", test_fraction=0.25)
    test = data.load_split(path, "test", test_fraction=0.25)
    assert not set(train.texts) & set(test.texts)
    assert sorted(train.texts + test.texts) == sorted(prompts)
    assert 0.15 < len(test) / 400 < 0.35
    assert train.texts == tuple(p for p in prompts if p in set(train.texts))  # file order
    # The split of a prompt depends on its text only: a shuffled file splits the same way.
    shuffled = write(tmp_path / "q.txt", "\n".join(reversed(prompts)))
    assert set(data.load_split(shuffled, "test", test_fraction=0.25).texts) == set(test.texts)
    # A larger fraction only moves prompts from train to test.
    assert set(test.texts) < set(data.load_split(path, "test", test_fraction=0.5).texts)
    assert data.load_split(path, "train").texts == tuple(prompts)  # fraction 0: all train


def _bad_inputs(tmp):
    """(label, path, kwargs, exception, substrings of the one-line message)."""
    folder = tmp / "half"
    folder.mkdir()
    write(folder / "train.txt", "a\n")
    return [
        ("missing", tmp / "nope.txt", {}, FileNotFoundError, ["nope.txt", "not found"]),
        ("empty", write(tmp / "empty.txt", ""), {}, ValueError, ["empty.txt", "no prompts"]),
        ("comments", write(tmp / "c.txt", "# only\n\n  \n#x\n"), {}, ValueError,
         ["c.txt", "no prompts", "add at least one"]),
        ("utf8", tmp / "bytes.txt", {}, ValueError, ["bytes.txt:2:", "0xff", "UTF-8"]),
        ("dict", write(tmp / "d.json", '{"prompt": "a"}'), {}, ValueError,
         ["d.json", "a JSON dict, not a list"]),
        ("no-field", write(tmp / "o.json", '[{"prompt": "a"}, {"caption": "b"}]'), {},
         ValueError, ["o.json", "item 1", "no \"prompt\" field", "caption"]),
        ("number", write(tmp / "n.json", '["a", 3]'), {}, ValueError,
         ["n.json", "item 1 is a int"]),
        ("bad-json", write(tmp / "b.json", '["a",\n "b"'), {}, ValueError,
         ["b.json:2:", "invalid JSON"]),
        ("jsonl-line", write(tmp / "l.jsonl", '{"prompt": "a"}\n\n{"prompt": b}\n'), {},
         ValueError, ["l.jsonl:3:", "invalid JSON", "one JSON object"]),
        ("jsonl-list", write(tmp / "m.jsonl", '{"prompt": "a"}\n["b"]\n'), {}, ValueError,
         ["m.jsonl:2:", "a JSON list, not an object"]),
        ("jsonl-field", write(tmp / "f.jsonl", '{"text": "a"}\n'), {}, ValueError,
         ["f.jsonl", "line 1 has no \"prompt\" field"]),
        ("format", write(tmp / "ok.txt", "a\n"), {"format": "csv"}, ValueError,
         ["ok.txt", "unknown prompt format 'csv'"]),
        ("folder-half", folder, {"split": "test"}, FileNotFoundError,
         ["half", "no test.txt", "put train.txt and test.txt"]),
        ("split", tmp / "ok.txt", {"split": "val"}, ValueError, ["unknown split 'val'"]),
        ("fraction", tmp / "ok.txt", {"test_fraction": 1.5}, ValueError,
         ["ok.txt", "test_fraction 1.5"]),
        ("both-tests", folder, {"test_fraction": 0.1}, ValueError,
         ["half", "drop test_fraction"]),
        ("empty-test", tmp / "ok.txt", {"split": "test", "test_fraction": 0.0}, ValueError,
         ["ok.txt", "test split", "raise test_fraction"]),
    ]


def test_bad_input_one_line_errors(tmp_path):
    (tmp_path / "bytes.txt").write_bytes(b"fine\nbad \xff byte\n")
    for label, path, kwargs, exc, parts in _bad_inputs(tmp_path):
        with pytest.raises(exc) as info:
            data.load_split(path, **kwargs)
        message = str(info.value)
        assert "\n" not in message, (label, message)
        for part in parts:
            assert part in message, (label, part, message)
    assert data.load_split(tmp_path / "half").texts == ("a",)  # train needs no test.txt
    with pytest.raises(ValueError, match="a folder, not a prompt file"):
        data.read_prompts(tmp_path)


# ----------------------------------------------------------------------------- order


def test_stream_is_a_function_of_seed_and_step():
    walked = data.PromptStream(37, 8, seed=5, process_count=1, process_index=0)
    batches = [walked.global_ids(s) for s in range(40)]  # walks across several epochs
    for s in (0, 4, 5, 23, 39):
        fresh = data.PromptStream(37, 8, seed=5, process_count=1, process_index=0)
        np.testing.assert_array_equal(fresh.global_ids(s), batches[s])  # resumed at step s
    assert all(b.dtype == np.int32 and b.shape == (8,) for b in batches)
    # Laid end to end, the batches walk epoch after epoch, each a permutation of all ids.
    flat = np.concatenate(batches)
    for e in range(len(flat) // 37):
        epoch = flat[e * 37:(e + 1) * 37]
        assert sorted(epoch) == list(range(37)), e
        np.testing.assert_array_equal(epoch, walked.epoch_order(e))
    assert not np.array_equal(flat[:37], flat[37:74])  # each epoch reshuffles
    other = data.PromptStream(37, 8, seed=6, process_count=1, process_index=0)
    assert not np.array_equal(other.global_ids(0), batches[0])
    big = data.PromptStream(3, 8, seed=0, process_count=1, process_index=0)  # batch > set
    assert sorted(np.concatenate([big.global_ids(s) for s in range(3)])) == \
        sorted(list(range(3)) * 8)
    with pytest.raises(ValueError, match="step -1"):
        walked.global_ids(-1)


def test_local_slices_concatenate_to_the_global_batch():
    for count in (1, 2, 4):
        streams = [data.PromptStream(50, 16, seed=1, process_index=i, process_count=count)
                   for i in range(count)]
        for step in (0, 3, 7):
            full = streams[0].global_ids(step)
            np.testing.assert_array_equal(np.concatenate([s.local(step) for s in streams]),
                                          full)
            # The global batch does not depend on the number of processes.
            np.testing.assert_array_equal(
                full, data.PromptStream(50, 16, seed=1, process_count=1,
                                        process_index=0).global_ids(step))
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        data.PromptStream(50, 16, seed=1, process_index=0, process_count=3)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int


def test_process_rows_follow_the_sharding():
    # Two hosts of two devices each, the four row blocks held by devices 0, 2, 1, 3: each
    # host's rows interleave (as with a batch split fsdp-major over a data axis of hosts).
    devices = [FakeDevice(i, process_index=i // 2) for i in range(4)]
    blocks = {devices[0]: 0, devices[2]: 1, devices[1]: 2, devices[3]: 3}
    sharding = types.SimpleNamespace(devices_indices_map=lambda shape: {
        d: (slice(b * shape[0] // 4, (b + 1) * shape[0] // 4),) for d, b in blocks.items()})
    np.testing.assert_array_equal(data.process_rows(8, sharding, process_index=0),
                                  [0, 1, 4, 5])
    np.testing.assert_array_equal(data.process_rows(8, sharding, process_index=1),
                                  [2, 3, 6, 7])
    stream = data.PromptStream(20, 8, seed=2, process_index=1, sharding=sharding)
    np.testing.assert_array_equal(stream.local(3), stream.global_ids(3)[[2, 3, 6, 7]])
    with pytest.raises(ValueError, match="process 2 holds no device"):
        data.process_rows(8, sharding, process_index=2)


def test_global_batch_single_process():
    mesh = parallel.make_mesh((-1, 1, 1))
    stream = data.PromptStream(20, 4, seed=0)
    ids = stream.local(2)
    out = data.global_batch({"id": ids, "x": np.ones((4, 3), np.float32),
                             "scale": np.float32(2.0)}, mesh)
    assert isinstance(out["id"], jax.Array) and out["id"].sharding.spec == \
        parallel.batch_sharding(mesh).spec
    np.testing.assert_array_equal(np.asarray(out["id"]), stream.global_ids(2))
    assert out["x"].shape == (4, 3) and float(out["scale"]) == 2.0


# ----------------------------------------------------------------------------- 2 hosts


def test_two_processes_read_their_slices_and_assemble_the_global_batch(tmp_path):
    path = write(tmp_path / "p.txt", "\n".join(f"prompt {i} " + "x" * (i % 7)
                                               for i in range(37)))
    outputs = multihost.run_workers(os.path.join(HERE, "multihost_data_worker.py"), [path],
                                    num_processes=2, devices_per_process=4, timeout=120)
    records = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    prompts = data.load_split(path)
    expected = data.PromptStream(prompts, 16, seed=3, process_count=1, process_index=0)
    assert [r["process"] for r in records] == [0, 1]
    assert all(r["devices"] == 8 and r["local_devices"] == 4 for r in records)
    assert [r["default_rows"] for r in records] == [list(range(8)), list(range(8, 16))]
    for mesh_name, rows in (("8x1x1", [range(8), range(8, 16)]),
                            ("2x4x1", [[0, 1, 4, 5, 8, 9, 12, 13],
                                       [2, 3, 6, 7, 10, 11, 14, 15]])):
        for record, own in zip(records, rows):
            assert record["meshes"][mesh_name]["rows"] == list(own)
        for step in ("0", "2", "5"):
            want = expected.global_ids(int(step))
            seen = [r["meshes"][mesh_name]["steps"][step] for r in records]
            for got, own in zip(seen, rows):
                assert got["shape"] == [16]
                assert got["global_id"] == want.tolist()  # equal to one process's batch
                assert got["global_length"] == [len(prompts.texts[i]) for i in want]
                # Each process read only its own rows, and its devices hold exactly those.
                assert got["local"] == want[list(own)].tolist()
                assert got["texts"] == prompts.lookup(want[list(own)])
                assert got["shard_rows"] == list(own)


def test_multihost_harness_fails_fast_and_kills_workers(tmp_path):
    crash = write(tmp_path / "crash.py", (
        "from tests import multihost\n"
        "multihost.initialize()\n"
        "import jax, numpy as np\n"
        "from jax.experimental import multihost_utils\n"
        "if jax.process_index() == 1:\n"
        "    raise RuntimeError('worker 1 gives up')\n"
        "multihost_utils.process_allgather(np.zeros(2))  # waits for worker 1 forever\n"))
    with pytest.raises(AssertionError, match="worker 1 exited with 1") as info:
        multihost.run_workers(str(crash), timeout=60)
    assert "worker 1 gives up" in str(info.value)
    hang = write(tmp_path / "hang.py", (
        "import os, sys, time\n"
        "open(os.path.join(sys.argv[1], str(os.getpid())), 'w').close()\n"
        "time.sleep(600)\n"))
    with pytest.raises(AssertionError, match="still running after 3 s"):
        multihost.run_workers(str(hang), [tmp_path], timeout=3)
    pids = [int(name) for name in os.listdir(tmp_path) if name.isdigit()]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
