"""Peak host memory of loading a FLUX.1-dev-wide transformer: streaming sharded vs load_flux.

    python benchmarks/loader_rss.py                 # 2 double + 3 single blocks, fp32, /tmp
    python benchmarks/loader_rss.py --dir /scratch --single 4 --json out.json

1. A writer process streams a BFL-layout `.safetensors` file of a FLUX.1-dev-width
   transformer (hidden 3072, 24 heads; depth reduced so the file is >= 4 GB in fp32):
   the header first, then each tensor's random bytes in chunks, so the writer holds one
   chunk, not the model. Its own peak RSS is reported.
2. A fresh process with 8 simulated CPU devices loads the file onto an FSDP=8 mesh with
   `weights.sharded.load_flux_sharded` (streaming: one tensor on the host at a time).
3. A fresh process loads it with `weights.flux.load_flux` (the whole tree on the host),
   then places that tree on the same mesh with `jax.device_put` (the non-streaming way to
   the same end state).

On CPU the "devices" are host memory too, so every loader ends holding the model once;
what differs is the overhead above it. Each process reports `ru_maxrss` (peak resident
set: anonymous memory plus the mapped file pages that safetensors' mmap touched) and the
peak of RssAnon sampled every 10 ms (the memory the loader itself allocated; mapped file
pages are page cache the kernel can drop). The file is deleted at the end (--keep keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_MONITOR = textwrap.dedent(r"""
    import resource, threading, time
    def _status():
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon", "RssFile", "VmRSS")):
                    out[line.split(":")[0]] = int(line.split()[1]) * 1024
        return out
    _peak = {"RssAnon": 0}
    def _watch():
        while True:
            _peak["RssAnon"] = max(_peak["RssAnon"], _status().get("RssAnon", 0))
            time.sleep(0.01)
    threading.Thread(target=_watch, daemon=True).start()
    def report(**extra):
        time.sleep(0.05)
        now = _status()
        return dict(extra, ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    peak_anon=max(_peak["RssAnon"], now.get("RssAnon", 0)),
                    end_rss=now.get("VmRSS", 0), end_anon=now.get("RssAnon", 0),
                    end_file=now.get("RssFile", 0))
""")

_WRITE = _MONITOR + textwrap.dedent(r"""
    import json, sys, time
    sys.path.insert(0, sys.argv[3])
    from benchmarks.loader_rss import bench_config, write_streaming_bfl
    t0 = time.perf_counter()
    size = write_streaming_bfl(sys.argv[1], bench_config(*json.loads(sys.argv[2])))
    print("RESULT" + json.dumps(report(bytes=size, seconds=time.perf_counter() - t0)))
""")

_STREAMING = _MONITOR + textwrap.dedent(r"""
    import json, sys, time
    import jax
    from leapalign_jax import parallel
    from leapalign_jax.weights.sharded import load_flux_sharded
    base = report()
    mesh = parallel.make_mesh((1, 8, 1))
    t0 = time.perf_counter()
    config, params = load_flux_sharded(sys.argv[1], mesh)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    leaves = jax.tree.leaves(params)
    on_devices = sum(s.data.nbytes for a in leaves for s in a.addressable_shards)
    largest_shard = max(s.data.nbytes for a in leaves for s in a.addressable_shards)
    print("RESULT" + json.dumps(report(seconds=seconds, baseline=base, on_devices=on_devices,
                                       largest_shard=largest_shard)))
""")

_PLAIN = _MONITOR + textwrap.dedent(r"""
    import json, sys, time
    import jax
    from leapalign_jax import parallel
    from leapalign_jax.models.flux import abstract_params
    from leapalign_jax.weights.flux import load_flux
    base = report()
    t0 = time.perf_counter()
    config, params = load_flux(sys.argv[1])
    host = report(seconds=time.perf_counter() - t0)
    mesh = parallel.make_mesh((1, 8, 1))
    shardings = parallel.logical_shardings(abstract_params(config), mesh)
    t0 = time.perf_counter()
    placed = jax.block_until_ready(jax.device_put(params, shardings))
    print("RESULT" + json.dumps({"baseline": base, "load_flux": host,
                                 "device_put": report(seconds=time.perf_counter() - t0)}))
""")


def bench_config(depth: int, depth_single: int):
    """FLUX.1-dev's widths (hidden 3072, 24 heads, T5 4096, CLIP 768) at a reduced depth."""
    from leapalign_jax.models.flux import FluxConfig

    return FluxConfig(depth=depth, depth_single_blocks=depth_single)


def write_streaming_bfl(path: str, config, chunk: int = 1 << 24, seed: int = 0) -> int:
    """Writes a BFL-layout float32 safetensors file of `config` with random values, the
    header first and then each tensor in chunks of `chunk` floats; returns its size."""
    from leapalign_jax.weights.flux import bfl_shapes

    shapes = bfl_shapes(config)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        size = int(np.prod(shape)) * 4
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset,
                                                                              offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for shape in shapes.values():
            left = int(np.prod(shape))
            while left:
                n = min(left, chunk)
                f.write(((rng.random(n, dtype=np.float32) - 0.5) * 0.04).tobytes())
                left -= n
    return os.path.getsize(path)


def _run(script: str, *args: str, devices: int = 1) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-4000:])
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp", help="where the file is written")
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=3, help="single-stream blocks")
    parser.add_argument("--keep", action="store_true", help="keep the file afterwards")
    parser.add_argument("--json", default="", help="also write the numbers here")
    args = parser.parse_args()

    from leapalign_jax.weights.flux import bfl_shapes

    shapes = bfl_shapes(bench_config(args.double, args.single))
    need = sum(int(np.prod(s)) for s in shapes.values()) * 4
    largest = max(int(np.prod(s)) for s in shapes.values()) * 4
    free = shutil.disk_usage(args.dir).free
    print(f"file {_gib(need)} (largest tensor {largest / 2**20:.0f} MiB); {_gib(free)} free "
          f"in {args.dir}")
    if free < need * 1.2:
        raise SystemExit(f"not enough disk in {args.dir}: need {_gib(need * 1.2)}; pass --dir")
    path = os.path.join(args.dir, f"loader_rss_flux_{os.getpid()}.safetensors")
    try:
        writer = _run(_WRITE, path, json.dumps([args.double, args.single]), ROOT)
        streaming = _run(_STREAMING, path, devices=8)
        plain = _run(_PLAIN, path, devices=8)
    finally:
        if not args.keep and os.path.exists(path):
            os.remove(path)
    size = writer["bytes"]
    rows = [
        ("writer (streaming)", writer["ru_maxrss"], writer["peak_anon"], writer["seconds"]),
        ("load_flux_sharded -> 8-device mesh", streaming["ru_maxrss"], streaming["peak_anon"],
         streaming["seconds"]),
        ("load_flux (host tree)", plain["load_flux"]["ru_maxrss"],
         plain["load_flux"]["peak_anon"], plain["load_flux"]["seconds"]),
        ("load_flux + device_put -> mesh", plain["device_put"]["ru_maxrss"],
         plain["device_put"]["peak_anon"],
         plain["load_flux"]["seconds"] + plain["device_put"]["seconds"]),
    ]
    base = streaming["baseline"]["ru_maxrss"]
    print(f"\nfile {_gib(size)}, largest tensor {largest / 2**20:.0f} MiB, params on the "
          f"8 CPU devices {_gib(streaming['on_devices'])}, process baseline (jax imported) "
          f"{_gib(base)}\n")
    print("| process | peak RSS (ru_maxrss) | / file | peak RssAnon | anon above file | time |")
    print("|---|---|---|---|---|---|")
    for name, rss, anon, seconds in rows:
        extra = "-" if name.startswith("writer") else f"{(anon - size) / 2**20:+.0f} MiB"
        print(f"| {name} | {_gib(rss)} | {rss / size:.2f} | {_gib(anon)} | {extra} | "
              f"{seconds:.1f} s |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"file_bytes": size, "largest_tensor_bytes": largest, "writer": writer,
                       "streaming": streaming, "plain": plain}, f, indent=2)


if __name__ == "__main__":
    main()
