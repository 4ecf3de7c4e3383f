"""Tiny random FLUX.1 folders built by diffusers / transformers, for parity tests.

`build_torch_flux_folder(path)` makes every component with the torch reference classes
(FluxTransformer2DModel, CLIPTextModel, T5EncoderModel, AutoencoderKL,
FlowMatchEulerDiscreteScheduler), randomises every parameter (norm weights and biases
included), saves them with `save_pretrained(safe_serialization=True)` in FLUX.1's layout
(T5 in shards with an index, as FLUX.1-dev), writes the tiny tokenizers of
`leapalign_jax.weights.flux_folder` (CLIP vocab.json + merges.txt, T5 tokenizer.json), and
returns the diffusers `FluxPipeline` read back from the folder, so both sides see the
same files. Torch and diffusers are imported only when called.

For a folder without torch, use `leapalign_jax.weights.flux_folder.write_tiny_flux_folder`.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from leapalign_jax.weights import flux_folder

# Sizes of the tiny models (tokenizer vocabularies: flux_folder's tiny tokenizers fit).
T5_VOCAB, CLIP_VOCAB = 128, 560
FLUX = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
T5 = dict(vocab_size=T5_VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=20,
          feed_forward_proj="gated-gelu", dropout_rate=0.0)
CLIP = dict(vocab_size=CLIP_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=0, pad_token_id=1, eos_token_id=2)  # FLUX.1-dev's legacy eos 2
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
           layers_per_block=1, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
           use_quant_conv=False, use_post_quant_conv=False)
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)


def randomize(module: Any, seed: int, scale: float = 0.1) -> None:
    """Adds noise to every parameter: `scale` x its own std where it varies (kernels keep
    their init's scale), `scale` absolute where it is constant (zero biases, unit norm
    weights), so every parameter is random and activations stay well scaled."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            spread = float(p.std()) if p.numel() > 1 else 0.0
            p.add_(scale * (spread or 1.0) * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def build_torch_flux_folder(path: str | os.PathLike, *, seed: int = 0,
                            guidance_embeds: bool = True, scheduler: dict | None = None,
                            sizes: dict[str, dict] | None = None) -> Any:
    """Writes a tiny random FLUX.1 folder with diffusers / transformers and returns the
    diffusers `FluxPipeline` loaded from it (float32, eval mode).

    `sizes` overrides constructor arguments per component ("transformer", "text_encoder",
    "text_encoder_2", "vae"), e.g. a mid-size T5 and VAE for benchmarks; the transformer's
    widths must keep matching the encoders and the VAE.
    """
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = os.fspath(path)
    torch.manual_seed(seed)
    sizes = sizes or {}
    parts = {
        "transformer": FluxTransformer2DModel(**FLUX | sizes.get("transformer", {}),
                                              guidance_embeds=guidance_embeds),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP | sizes.get("text_encoder", {}))),
        "text_encoder_2": T5EncoderModel(T5Config(**T5 | sizes.get("text_encoder_2", {}))),
        "vae": AutoencoderKL(**VAE | sizes.get("vae", {})),
    }
    for i, (name, module) in enumerate(parts.items()):
        randomize(module, seed * 10 + i)
        shards = {}
        if name == "text_encoder_2":  # a few shards with an index, as FLUX.1-dev's T5
            size = sum(p.numel() * p.element_size() for p in module.parameters())
            shards = {"max_shard_size": int(0.45 * size)}
        module.eval().save_pretrained(os.path.join(folder, name), safe_serialization=True,
                                      **shards)
    FlowMatchEulerDiscreteScheduler(**(scheduler or SCHEDULER)).save_pretrained(
        os.path.join(folder, "scheduler"))
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    flux_folder.write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    flux_folder.write_t5_tokenizer(os.path.join(folder, "tokenizer_2"))
    flux_folder.write_model_index(folder)
    return FluxPipeline.from_pretrained(folder, dtype=torch.float32)
