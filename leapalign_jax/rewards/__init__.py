"""The paper's judges as differentiable JAX rewards, and their weighted combinations.

    from leapalign_jax.rewards import load_reward
    r = load_reward("hpsv21", "HPS_v2.1_compressed.pt", tokenizer="clip-tokenizer/")
    scores = r(images, prompts)              # images (B, H, W, 3) in [0, 1] -> (B,)

    features = r.encode_text(prompts)        # once per prompt, outside the train step
    scores = r.score(r.params, images, features)   # pure, jittable, differentiable

| name        | checkpoint                                  | score                           |
|-------------|---------------------------------------------|---------------------------------|
| hpsv21      | HPS_v2.1_compressed.pt (OpenCLIP ViT-H-14)  | cosine (HPSv2's number)         |
| pickscore   | PickScore_v1 folder (HF CLIPModel ViT-H-14) | exp(logit_scale) * cosine       |
| clip_score  | any HF CLIPModel folder (ViT-L/14)          | cosine (x100 for "CLIPScore")   |
| aesthetic   | sac+logos+ava1-l14-linearMSE.pth + backbone | LAION aesthetic rating          |

`load_rewards("hpsv21:1.0,pickscore:0.05", {"hpsv21": {...}, "pickscore": {...}})` gives a
`CombinedReward` whose `score` returns the weighted sum and each term.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

from leapalign_jax.rewards import aesthetic, clip_score, hpsv21, pickscore
from leapalign_jax.rewards.base import Reward
from leapalign_jax.rewards.combine import CombinedReward, Weights, combine, parse_weights

# name -> loader(path, **options) -> Reward
REWARDS: dict[str, Callable[..., Reward]] = {
    hpsv21.NAME: hpsv21.load,
    pickscore.NAME: pickscore.load,
    clip_score.NAME: clip_score.load,
    aesthetic.NAME: aesthetic.load,
}

__all__ = ["REWARDS", "CombinedReward", "Reward", "load_reward", "load_rewards",
           "reward_weights"]


def load_reward(name: str, path: str | os.PathLike, **options: Any) -> Reward:
    """Loads the reward `name` from `path` (a file or folder, see the table above).

    `options` go to the reward's loader: `tokenizer=` (a CLIP tokenizer folder; required for
    hpsv21), `backbone=` (aesthetic: the CLIP ViT-L/14 folder), `dtype=` ("float32" /
    "bfloat16" compute), `remat=` (vision layers), `text_heads=` / `vision_heads=` (hpsv21).

    Raises:
      ValueError: unknown name or option, or a checkpoint of the wrong layout.
      FileNotFoundError: a missing checkpoint or tokenizer.
    """
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
    try:
        return REWARDS[name](path, **options)
    except TypeError as err:
        if "unexpected keyword" not in str(err):
            raise
        raise ValueError(f"reward {name}: {err}; see load_reward's options") from None


def reward_weights(spec: str | Sequence[Any] | Mapping[str, Any]) -> Weights:
    """`"hpsv21:1.0,pickscore:0.05"` (or a list / mapping) -> [(name, weight)], checked."""
    return parse_weights(spec, REWARDS)


def load_rewards(spec: str | Sequence[Any] | Mapping[str, Any],
                 sources: Mapping[str, Mapping[str, Any]]) -> CombinedReward:
    """Loads every reward named in `spec` and combines them with its weights.

    `sources[name]` holds `path` and that reward's options, e.g.
    `{"hpsv21": {"path": "HPS_v2.1_compressed.pt", "tokenizer": "tok/"}}`.
    """
    weights = reward_weights(spec)
    loaded = {}
    for name, _ in weights:
        options = dict(sources.get(name) or {})
        if "path" not in options:
            raise ValueError(f"reward {name} is weighted but sources[{name!r}] has no 'path'; "
                             "give its checkpoint")
        loaded[name] = load_reward(name, options.pop("path"), **options)
    return combine(loaded, weights)
