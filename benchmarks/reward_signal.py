"""How much the shapes world's reward can teach, by ranking and by its gradient.

    python benchmarks/reward_signal.py --cache-dir /path/to/shapes_cache   # ~3 minutes
    python benchmarks/reward_signal.py --tiny --cache-dir DIR              # smoke run

Direct-gradient alignment needs two things from a reward: that it ranks the judge's
correct images above the wrong ones, and that its gradient points towards correct
images. This script measures both on held-out prompts with the base generator and the
exact checker as judge (the reward never sees the checker):

- **Ranking**: for each prompt, `--samples` images from different noise. Accuracy of one
  sample, of the sample the reward picks (best-of-N), and of "any of the N is correct"
  (the ceiling of selection). Best-of-N is what a reward-guided method could reach if it
  only had to prefer the generator's own good samples.
- **Gradient**: normalised gradient descent on the hinge loss `max(0, lambda - r)` through
  the decoder, from each image's clean latent: `x <- x - step * g / rms(g)`, reward and
  accuracy every few steps, for each `--hinge-lambdas` value (lambda >= 1 is plain ascent
  on the reward, since a cosine reward stays below 1). A reward whose gradient follows the
  judge raises accuracy as it raises the reward; one whose gradient is adversarial raises
  the reward while accuracy falls. A lower lambda leaves the images already above it alone,
  which is what the training hinge does.
- **Gradient through the trajectory** (`--noise-steps`): the same descent on the initial
  noise instead, through the whole sampling rollout (`x0 <- x0 - step * g / rms(g)`). It
  reaches the early, high-noise steps that decide layout, as LeapAlign's leaps do, with
  the generator's params fixed: if it lifts accuracy well past the clean-latent descent,
  the reward's gradient can teach layout and what limits a method is getting it into the
  params.

Writes `--out`/reward_signal.md and reward_signal.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def shapes_world(tiny: bool, cache_dir: str, tuned: bool = True) -> tuple[Any, Any, Any]:
    """(config, world, batch_of) of the shapes world (`:tiny` with `tiny`) in `cache_dir`
    ("" = the config's); `batch_of(prompts)` is `toy.world.prompt_batcher`'s. With
    `tuned=False` the world's reward is the contrastive one (no tuning stage)."""
    from leapalign_jax import config_lib
    from leapalign_jax.toy import world as shapes

    config = config_lib.load_config(os.path.join(REPO, "configs", "toy_leapalign.py")
                                    + (":tiny" if tiny else ""))
    if cache_dir:
        config.world.cache_dir = cache_dir
    built = config.copy_and_resolve_references()
    if not tuned:
        built.world.reward_tuning.rounds = 0
    world = shapes.build(built)
    # The models are in the cache now: this reads the generator's text encoder back.
    generator = shapes.build_models(built.world)["generator"]
    return config, world, shapes.prompt_batcher(generator, config.world)


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """The shapes world, its held-out prompts (`--per-category` each) and jitted pieces."""
    import jax
    import jax.numpy as jnp

    from leapalign_jax import flow, sampling
    from leapalign_jax.toy import world as shapes

    config, world, batch_of = shapes_world(args.tiny, args.cache_dir)
    pipe, frozen, wc = world.pipe, world.frozen, config.world
    specs = shapes.heldout_specs(args.per_category)
    batch = batch_of(specs)
    velocity = sampling.conditioned_velocity(pipe, batch)

    def reward_of_latent(x):
        return pipe.reward(frozen, pipe.decode(frozen, x), batch)

    return {
        "specs": specs, "params": world.params, "seed": wc.seed,
        "noise": lambda key: sampling.initial_noise(key, batch, pipe),
        "rollout": jax.jit(lambda p, x0: flow.euler_rollout(velocity, p, x0, pipe.sigmas)[0]),
        "decode": jax.jit(lambda x: pipe.decode(frozen, x)),
        "reward": jax.jit(reward_of_latent),
        "grad": jax.jit(jax.grad(lambda x, lam: jnp.sum(
            jnp.maximum(0.0, lam - reward_of_latent(x))))),
        "noise_grad": jax.jit(jax.grad(lambda x0, params, lam: jnp.sum(jnp.maximum(
            0.0, lam - reward_of_latent(flow.euler_chain(velocity, params, x0,
                                                         pipe.sigmas)))))),
    }


def judge(images: np.ndarray, specs: list) -> np.ndarray:
    from leapalign_jax.toy import checker

    return np.array([checker.check(np.asarray(image), p) for image, p in zip(images, specs)])


def summarize(passed: np.ndarray, specs: list) -> dict[str, float]:
    from leapalign_jax.toy import checker

    return {k: round(v, 4) for k, v in checker.summarize(list(passed), specs).items()}


def ranking(s: dict[str, Any], samples: int) -> dict[str, Any]:
    """Accuracy of one sample, of the reward's pick of `samples`, and of any of them."""
    import jax

    rewards, passed = [], []
    for n in range(samples):
        x = s["rollout"](s["params"], s["noise"](jax.random.key(s["seed"] + 3000 + n)))
        rewards.append(np.asarray(s["reward"](x)))
        passed.append(judge(np.asarray(s["decode"](x)), s["specs"]))
    rewards, passed = np.stack(rewards), np.stack(passed)  # (samples, prompts)
    pick = rewards.argmax(axis=0)
    columns = np.arange(len(s["specs"]))
    return {"samples": samples,
            "one_sample": summarize(passed[0], s["specs"]),
            "mean_of_samples": round(float(passed.mean()), 4),
            "reward_pick": summarize(passed[pick, columns], s["specs"]),
            "any_correct": summarize(passed.any(axis=0), s["specs"]),
            "reward_one": round(float(rewards[0].mean()), 4),
            "reward_pick_mean": round(float(rewards[pick, columns].mean()), 4)}


def ascent(s: dict[str, Any], step: float, steps: int, every: int, hinge_lambda: float,
           through_rollout: bool = False) -> list[dict[str, Any]]:
    """Reward and accuracy along normalised descent on the hinge loss, of the clean
    latents, or of the initial noise through the rollout (`through_rollout`); the RMS
    change is that of the clean latent either way."""
    import jax
    import jax.numpy as jnp

    noise = s["noise"](jax.random.key(s["seed"] + 3000))
    start, points = s["rollout"](s["params"], noise), []
    x = noise if through_rollout else start
    for k in range(steps + 1):
        if k % every == 0 or k == steps:
            clean = s["rollout"](s["params"], x) if through_rollout else x
            acc = summarize(judge(np.asarray(s["decode"](clean)), s["specs"]), s["specs"])
            points.append({"step": k, "latent_rms_change": round(float(
                jnp.sqrt(jnp.mean((clean - start) ** 2))), 4),
                "reward": round(float(jnp.mean(s["reward"](clean))), 4), **acc})
        if k < steps:
            g = (s["noise_grad"](x, s["params"], hinge_lambda) if through_rollout
                 else s["grad"](x, hinge_lambda))
            x = x - step * g / (jnp.sqrt(jnp.mean(g * g, axis=(1, 2), keepdims=True)) + 1e-12)
    return points


def markdown(result: dict[str, Any]) -> str:
    cats = [k for k in result["ranking"]["one_sample"] if k != "overall"] + ["overall"]
    r = result["ranking"]
    lines = [
        "# What the shapes world's reward can teach: ranking and gradient", "",
        f"Command: `{result['command']}`; {result['machine']}; {result['elapsed_s']:.0f} s. "
        f"Held-out prompts, {result['per_category']} per category, base generator, exact "
        "checker as judge.", "",
        f"## Ranking: best of {r['samples']} samples by reward", "",
        "| images | " + " | ".join(cats) + " | mean reward |",
        "|---|" + "---|" * (len(cats) + 1),
        "| one sample | " + " | ".join(f"{r['one_sample'][c]:.3f}" for c in cats)
        + f" | {r['reward_one']:.3f} |",
        "| the reward's pick | " + " | ".join(f"{r['reward_pick'][c]:.3f}" for c in cats)
        + f" | {r['reward_pick_mean']:.3f} |",
        "| any one correct (ceiling) | " + " | ".join(f"{r['any_correct'][c]:.3f}"
                                                     for c in cats) + " | - |", "",
        f"## Gradient: descent on max(0, lambda - r) through the decoder (step "
        f"{result['step']} of the latent RMS)", ""]
    runs = [(f"lambda = {run['hinge_lambda']:g}", run["points"]) for run in result["ascent"]]
    if "noise_ascent" in result:
        runs.append((f"## Gradient through the trajectory: ascent on the initial noise (step "
                     f"{result['noise_step']} of its RMS; RMS change of the clean latent)",
                     result["noise_ascent"]))
    for title, points in runs:
        lines += [title, "",
                  "| step | latent RMS change | reward | " + " | ".join(cats) + " |",
                  "|---|---|---|" + "---|" * len(cats)]
        for p in points:
            lines.append(f"| {p['step']} | {p['latent_rms_change']:.3f} | {p['reward']:.3f} | "
                         + " | ".join(f"{p[c]:.3f}" for c in cats) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def world_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by `doc`'s first paragraph, with the shapes-world flags
    (--cache-dir, --tiny) that `shapes_world` takes."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--cache-dir", default="", help="the shapes-world cache (default: "
                        "the config's; the shipped models are copied into it)")
    parser.add_argument("--tiny", action="store_true", help="the :tiny world (smoke run)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = world_parser(__doc__)
    parser.add_argument("--per-category", type=int, default=32,
                        help="held-out prompts per category (default 32)")
    parser.add_argument("--samples", type=int, default=8, help="N of best-of-N (default 8)")
    parser.add_argument("--step", type=float, default=0.01,
                        help="ascent step, in units of the latent RMS (default 0.01)")
    parser.add_argument("--ascent-steps", type=int, default=30)
    parser.add_argument("--hinge-lambdas", type=float, nargs="+", default=[1.0, 0.6],
                        help="one descent per lambda (default 1.0, plain ascent, and 0.6)")
    parser.add_argument("--every", type=int, default=10, help="measure every N ascent steps")
    parser.add_argument("--noise-steps", type=int, default=30,
                        help="steps of descent on the initial noise through the rollout, "
                        "plain ascent (lambda 1; 0: skip)")
    parser.add_argument("--noise-step", type=float, default=0.03,
                        help="its step, in units of the noise's RMS (default 0.03)")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = parser.parse_args(argv)
    if (args.samples < 1 or args.per_category < 1 or args.ascent_steps < 0 or args.every < 1
            or args.noise_steps < 0):
        parser.error("--samples, --per-category and --every must be >= 1, --ascent-steps "
                     "and --noise-steps >= 0")
    start = time.time()
    s = setup(args)
    result = {"command": "python benchmarks/reward_signal.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
              "per_category": args.per_category, "step": args.step,
              "ranking": ranking(s, args.samples),
              "ascent": [{"hinge_lambda": lam,
                          "points": ascent(s, args.step, args.ascent_steps, args.every, lam)}
                         for lam in args.hinge_lambdas]}
    if args.noise_steps:
        result["noise_step"] = args.noise_step
        result["noise_ascent"] = ascent(s, args.noise_step, args.noise_steps, args.every, 1.0,
                                        through_rollout=True)
    result["elapsed_s"] = round(time.time() - start, 1)
    write_results(args.out, "reward_signal", result, markdown(result))
    return result


def write_results(out: str, name: str, result: dict[str, Any], text: str) -> None:
    """`out/name.json` (the result) and `out/name.md` (`text`, also printed); gs:// too."""
    from leapalign_jax import paths

    paths.makedirs(out)
    paths.write_text(paths.join(out, f"{name}.json"), json.dumps(result, indent=2))
    paths.write_text(paths.join(out, f"{name}.md"), text)
    print(text)


if __name__ == "__main__":
    main()
