"""One process of the 2-host prompt-stream test (started by tests/multihost.run_workers).

Reads the prompt file given as argv[1], and for two meshes and a few steps builds only its
own rows of the global batch (`PromptStream.local`), looks up only those prompts, assembles
the global arrays with `data.global_batch`, gathers them back with `process_allgather`, and
prints one JSON line with what it read and what the global arrays held.
"""

import json
import sys

import multihost

multihost.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from leapalign_jax import data, parallel  # noqa: E402

BATCH, SEED, STEPS = 16, 3, (0, 2, 5)


def main(prompt_file: str) -> None:
    prompts = data.load_split(prompt_file)
    record = {"process": jax.process_index(), "devices": jax.device_count(),
              "local_devices": jax.local_device_count(), "meshes": {}}
    for shape in ((8, 1, 1), (2, 4, 1)):  # (2, 4, 1): the batch rows of a host interleave
        mesh = parallel.make_mesh(shape)
        stream = data.PromptStream(prompts, BATCH, SEED, sharding=parallel.batch_sharding(mesh))
        steps = {}
        for step in STEPS:
            ids = stream.local(step)
            texts = prompts.lookup(ids)  # the only prompts this process reads
            local = {"id": ids, "length": np.array([len(t) for t in texts], np.int32)}
            arrays = data.global_batch(local, mesh)
            shard_rows = sorted(  # rows of the global array that this process's devices hold
                int(r) for s in arrays["id"].addressable_shards
                for r in range(BATCH)[s.index[0]])
            gathered = multihost_utils.process_allgather(arrays, tiled=True)
            steps[step] = {"local": ids.tolist(), "texts": texts, "shard_rows": shard_rows,
                           "global_id": np.asarray(gathered["id"]).tolist(),
                           "global_length": np.asarray(gathered["length"]).tolist(),
                           "shape": list(arrays["id"].shape)}
        record["meshes"]["x".join(map(str, shape))] = {"rows": stream.rows.tolist(),
                                                       "steps": steps}
    default = data.PromptStream(prompts, BATCH, SEED)  # jax.process_index()/process_count()
    record["default_rows"] = default.rows.tolist()
    print(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
