"""The offline shapes world: a miniature text-to-image benchmark.

- `scenes`: 32x32 scenes of coloured squares, circles and triangles, and their renderer.
- `prompts`: GenEval-style prompts in six categories, their train/held-out split, scenes
  that satisfy a prompt, and hard negatives.
- `checker`: the exact, non-differentiable judge (`check`, `score`).
- `tokenizer`: word-level tokenizer over the prompt vocabulary.
- `text_encoder`: the toy "T5 + CLIP" text encoder of the generator.
- `autoencoder`: the toy VAE, 32x32x3 <-> 8x8x4.
- `reward`: the toy CLIP-style reward model (the shapes world's HPSv2).
- `cache`: saving and loading parameter trees.
- `pretrain`, `world`: the generator's pretraining and the `World` built from all this.
"""
