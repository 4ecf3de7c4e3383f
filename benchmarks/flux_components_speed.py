"""FLUX.1 pipeline pieces, JAX vs torch CPU: T5 encode and VAE decode, in one run, one table.

    python benchmarks/flux_components_speed.py [--runs 5] [--dtype float32]
        [--t5-d-model 512] [--t5-layers 8] [--t5-heads 8] [--t5-d-ff 1024] [--seq 512]
        [--batch 2] [--vae-widths 64 128 256 256] [--image 256]

One random mid-size FLUX.1 folder (T5 v1.1 and a 16-channel VAE at the sizes above, tiny
transformer and CLIP) is built with diffusers / transformers and saved in FLUX.1's layout
(tests/flux_fixtures.py); `load_flux_pipeline` and diffusers' `FluxPipeline.from_pretrained`
read the same folder. Timed, after one warm-up call (JAX compiles there), alternating
between the two sides so both see the same machine load:

- T5 encode: `pipe.t5_embeds(ids)` (the jitted T5 of `encode_prompts`) on prompts
  tokenized to `--seq` vs `text_encoder_2(ids)`;
- VAE decode: `pipe.decode(packed, H, W)` (unpack, scale, decode, to [0, 1]) vs FluxPipeline's
  `_unpack_latents` + scaling + `vae.decode` + `postprocess(output_type="np")`.

Prints the median of `--runs` calls of each and the ratio torch / JAX, plus the largest
relative output difference. Supersedes t5_speed.py and vae_speed.py for this comparison
(those time the bare models, with more knobs). Needs torch and diffusers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")]
from leapalign_jax.flux_pipeline import load_flux_pipeline  # noqa: E402
from t5_speed import _interleaved_times  # noqa: E402

PROMPTS = ["a photo of a red cat on the table", "two blue squares and a small green circle"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of the JAX side (torch stays float32)")
    parser.add_argument("--t5-d-model", type=int, default=512)
    parser.add_argument("--t5-layers", type=int, default=8)
    parser.add_argument("--t5-heads", type=int, default=8, help="heads of 64")
    parser.add_argument("--t5-d-ff", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=512, help="T5 tokens (FLUX.1-dev: 512)")
    parser.add_argument("--batch", type=int, default=2, help="prompts (T5) / images (VAE)")
    parser.add_argument("--vae-widths", type=int, nargs="+", default=[64, 128, 256, 256])
    parser.add_argument("--image", type=int, default=256, help="decoded image side")
    args = parser.parse_args()
    if args.runs < 3:
        parser.error("--runs must be >= 3 (the table reports medians)")
    try:
        import torch
        import flux_fixtures
    except ImportError as err:
        raise SystemExit(f"flux_components_speed.py needs torch and diffusers ({err}); "
                         "pip install -r requirements-test.txt") from err

    n = len(args.vae_widths)
    sizes = {
        "transformer": dict(joint_attention_dim=args.t5_d_model, in_channels=64),
        "text_encoder_2": dict(d_model=args.t5_d_model, d_kv=64, num_heads=args.t5_heads,
                               d_ff=args.t5_d_ff, num_layers=args.t5_layers,
                               relative_attention_num_buckets=32,
                               relative_attention_max_distance=128),
        "vae": dict(latent_channels=16, block_out_channels=tuple(args.vae_widths),
                    down_block_types=("DownEncoderBlock2D",) * n,
                    up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=2,
                    norm_num_groups=32),
    }
    with tempfile.TemporaryDirectory() as folder:
        ref = flux_fixtures.build_torch_flux_folder(folder, sizes=sizes)
        pipe = load_flux_pipeline(folder, dtype=args.dtype,
                                  components=["transformer", "t5", "clip", "vae"])
    prompts = (PROMPTS * args.batch)[:args.batch]
    t5_ids, _ = pipe.tokenize(prompts, args.seq)
    t5_ids_torch = torch.from_numpy(t5_ids.astype(np.int64))
    side = args.image
    rng = np.random.default_rng(0)
    h = 2 * (side // (ref.vae_scale_factor * 2))
    packed = rng.standard_normal((args.batch, (h // 2) ** 2, 64)).astype(np.float32)
    packed_torch = torch.from_numpy(packed)
    pipe.params.update(jax.device_put({k: pipe.params[k] for k in ("t5", "vae")}))
    out = {}

    def jax_t5():
        out["jax_t5"] = jax.block_until_ready(pipe.t5_embeds(t5_ids))

    def torch_t5():
        with torch.inference_mode():
            out["torch_t5"] = ref.text_encoder_2(t5_ids_torch)[0]

    def jax_vae():
        out["jax_vae"] = jax.block_until_ready(pipe.decode(packed, side, side))

    def torch_vae():
        with torch.inference_mode():
            z = ref._unpack_latents(packed_torch, side, side, ref.vae_scale_factor)
            z = z / ref.vae.config.scaling_factor + ref.vae.config.shift_factor
            image = ref.vae.decode(z, return_dict=False)[0]
            out["torch_vae"] = ref.image_processor.postprocess(image, output_type="np")

    rows = []
    for name, what, fns in [
            ("T5 encode", f"d_model {args.t5_d_model}, {args.t5_layers} layers, "
             f"{args.t5_heads}x64 heads, d_ff {args.t5_d_ff}; {args.batch} x {args.seq} tokens",
             {"jax": jax_t5, "torch": torch_t5}),
            ("VAE decode", f"widths {args.vae_widths}, 2 layers, 16 latent ch; {args.batch} x "
             f"{h}x{h} latent -> {side}x{side}", {"jax": jax_vae, "torch": torch_vae})]:
        first, median = _interleaved_times(fns, args.runs)
        key = "t5" if name.startswith("T5") else "vae"
        ours, theirs = np.asarray(out[f"jax_{key}"]), np.asarray(out[f"torch_{key}"])
        err = np.abs(ours - theirs).max() / np.abs(theirs).max()
        rows.append((name, what, median["jax"], median["torch"], first["jax"], err))

    print(f"FLUX.1 components, JAX {args.dtype} ({jax.devices()[0].platform}) vs torch float32 "
          f"(cpu, {torch.get_num_threads()} threads), {os.cpu_count()} CPU cores, median of "
          f"{args.runs} after one warm-up, load average {os.getloadavg()[0]:.1f}\n")
    print("| component | config | JAX ms | torch ms | torch / JAX | JAX first call s "
          "| max rel diff |")
    print("|---|---|---|---|---|---|---|")
    for name, what, jax_s, torch_s, first_s, err in rows:
        print(f"| {name} | {what} | {jax_s * 1e3:.0f} | {torch_s * 1e3:.0f} | "
              f"{torch_s / jax_s:.2f} | {first_s:.1f} | {err:.1e} |")


if __name__ == "__main__":
    main()
