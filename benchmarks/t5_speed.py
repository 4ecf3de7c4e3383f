"""Encode time of our jitted T5 encoder against transformers' torch `T5EncoderModel`.

    python benchmarks/t5_speed.py [--d-model 512] [--layers 8] [--seq 512] [--batch 2]
                                  [--runs 5] [--dtype float32]

Both run the same random mid-size T5 v1.1 (gated gelu, FLUX's 32 buckets / distance 128):
the torch model is saved with `save_pretrained` and read back by `load_t5`, so the check
also covers the loader. Prints the median wall time of each after one warm-up call (the
JAX one compiles there; timed calls alternate between the two so both see the same load),
their ratio, and the largest output difference. Needs torch and transformers (optional
dependencies, imported here only).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from leapalign_jax.models.t5 import T5Encoder  # noqa: E402
from leapalign_jax.weights.t5 import load_t5  # noqa: E402


def _interleaved_times(fns: dict, runs: int) -> tuple[dict, dict]:
    """First-call seconds and median of `runs` later calls, per function.

    Calls alternate between the functions so that both see the same machine load.
    """
    first, times = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return first, {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8, help="heads of 64")
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=512, help="tokens (FLUX.1-dev pads to 512)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of the JAX model (torch stays float32)")
    args = parser.parse_args()

    import torch
    from transformers import T5Config as HFT5Config, T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(HFT5Config(
        vocab_size=32128, d_model=args.d_model, d_kv=64, d_ff=args.d_ff,
        num_layers=args.layers, num_heads=args.heads, feed_forward_proj="gated-gelu",
        dropout_rate=0.0)).eval()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        config, params = load_t5(folder)
    config = dataclasses.replace(config, dtype=args.dtype)
    params = jax.device_put(params)

    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq))
    ids_jax = jax.device_put(ids.astype(np.int32))
    ids_torch = torch.from_numpy(ids)
    encode = jax.jit(T5Encoder(config).apply)
    outputs = {}

    def run_jax():
        outputs["jax"] = jax.block_until_ready(encode({"params": params}, ids_jax))

    def run_torch():
        with torch.inference_mode():
            outputs["torch"] = model(input_ids=ids_torch).last_hidden_state

    first, median = _interleaved_times({"jax": run_jax, "torch": run_torch}, args.runs)
    jax_first, jax_s, torch_first, torch_s = (first["jax"], median["jax"], first["torch"],
                                              median["torch"])
    diff = np.abs(np.asarray(outputs["jax"]) - outputs["torch"].numpy()).max()
    scale = np.abs(outputs["torch"].numpy()).max()

    print(f"T5 encoder d_model={args.d_model} layers={args.layers} heads={args.heads}x64 "
          f"d_ff={args.d_ff} batch={args.batch} seq={args.seq}, "
          f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
    print(f"  jax ({args.dtype}, {jax.devices()[0].platform}): median {jax_s * 1e3:.0f} ms "
          f"over {args.runs} runs (first call incl. compile {jax_first:.1f} s)")
    print(f"  torch (float32, cpu): median {torch_s * 1e3:.0f} ms over {args.runs} runs "
          f"(first call {torch_first:.1f} s)")
    print(f"  ratio torch / jax: {torch_s / jax_s:.2f}x; max |jax - torch| {diff:.2e} "
          f"(relative {diff / scale:.2e})")


if __name__ == "__main__":
    main()
