"""One process of the 2-host training tests (started by tests/test_multihost.py).

    python tests/multihost_train_worker.py WORKDIR MARKERS SLEEP VARIANT [--config.x=y ...]

Joins the job the way tests/multihost.py does (gloo CPU collectives; a short heartbeat
timeout so a killed peer is noticed in seconds), then runs the train task of
configs/random_flux.py:VARIANT in WORKDIR through `main.setup_logging` and
`tasks.train_and_report` (what `python -m leapalign_jax.main` runs). A hook records, for
each step, the global prompt ids this process saw (gathered from every host) and the rows
it read itself, and after step s touches MARKERS/<process>-<s> and sleeps SLEEP seconds, so
the test can signal a host at a known point. WORKER_EVALUATE=0 in the environment skips the
world's evaluation (fewer compilations where a test does not look at it). The last line on
stdout is a JSON record; on SIGTERM the record is printed and the exit status (42) kept.
"""

import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import multihost  # noqa: E402

HEARTBEAT_S = 10


def initialize() -> None:
    """`multihost.initialize` with a short heartbeat timeout and no compilation cache."""
    import jax

    sys.excepthook = multihost._exit_on_error
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Gloo gives processes 30 s to meet at a new collective. The persistent compilation
    # cache holds process 0's executables only, so a rerun would find process 0's cached
    # and compile process 1's: off, both compile alike.
    jax.config.update("jax_enable_compilation_cache", False)
    coordinator, count, index = (os.environ[k] for k in multihost._ENV)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(count),
                               process_id=int(index), initialization_timeout=60,
                               heartbeat_timeout_seconds=HEARTBEAT_S)


initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from leapalign_jax import config_lib, data, main, parallel, paths, tasks, train  # noqa: E402

CONFIG = os.path.join(multihost.ROOT, "configs", "random_flux.py")


def load_config(variant, overrides):
    config = config_lib.load_config(f"{CONFIG}:{variant}" if variant else CONFIG)
    for item in overrides:
        key, value = item.removeprefix("--config.").split("=", 1)
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[name] = type(node[name])(json.loads(value)) if not isinstance(
            node[name], str) else value
    return config


def run(workdir: str, markers: str, sleep: float, variant: str, overrides: list[str]) -> None:
    config = load_config(variant, overrides)
    mesh = parallel.make_mesh(config.mesh.shape)
    config_lib.validate(config, parallel.data_parallel_size(mesh), config.world.num_steps)
    index = jax.process_index()
    rows = data.process_rows(config.train.batch_size, parallel.batch_sharding(mesh)).tolist()
    record = {"process": index, "devices": jax.device_count(), "rows": rows, "steps": {}}
    world_batches = {}

    def hook(step, state, metrics):
        del metrics
        # What the trainer fed this step: this process's rows, and the assembled batch.
        world = world_batches["world"]
        local = train.process_batch(world, step - 1, np.asarray(rows))
        batch = data.global_batch(local, mesh)
        gathered = multihost_utils.process_allgather(batch["prompt_id"], tiled=True)
        record["steps"][step] = {"local_ids": local["prompt_id"].tolist(),
                                 "global_ids": np.asarray(gathered).tolist(),
                                 "state_step": int(jax.device_get(state.step))}
        paths.write_text(os.path.join(markers, f"{index}-{step}"), "")
        time.sleep(sleep)

    build = tasks.build_world

    def build_and_keep(cfg):
        world = build(cfg)
        if os.environ.get("WORKER_EVALUATE", "1") == "0":  # skip the before/after evaluation
            world = dataclasses.replace(world, evaluate=None)
        world_batches["world"] = world
        return world

    tasks.build_world = build_and_keep
    paths.makedirs(workdir)
    handler = main.setup_logging(
        paths.join(workdir, "log.txt" if index == 0 else f"log-{index}.txt"))
    try:
        tasks.train_and_report(config, workdir, hooks=(train.Hook(hook, 1),))
    except SystemExit as e:
        record["exit"] = e.code
        print(json.dumps(record), flush=True)
        raise
    finally:
        handler.close()
    record["exit"] = 0
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5:])
