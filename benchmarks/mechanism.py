"""Where along the trajectory each method's update acts: the paper's mechanism, measured.

    python benchmarks/mechanism.py --cache-dir /path/to/shapes_cache       # shapes world
    python benchmarks/mechanism.py --world random_flux --batches 1          # smoke test

LeapAlign's claim is that direct-gradient methods cannot update the early, high-noise
steps that fix an image's layout, and that its two leaps can. For each method this script
takes the direction of its first update (the loss gradient at the base params, averaged
over `--batches` training batches, normalised to unit norm) and measures what that update
does to the velocity at every step of the base model's own sampling trajectory on the
held-out grid prompts:

    effect_t = RMS over samples and latent entries of  d v(x_t, sigma_t) / d theta . g

(a Jacobian-vector product, the first-order change of the velocity), and its share
`effect_t^2 / sum_t effect_t^2`. The early share (steps with sigma > 0.5) says how much of
the update reaches the high-noise steps. With `--compare-results` (a compare_methods.py
results.json) the table adds each method's held-out gain on the position and color_attr
categories, the layout and binding categories the early steps decide. A random unit direction in
parameter space is the reference profile (the network's own sensitivity per step).

Writes `--out`/mechanism.md, mechanism.json and mechanism.png.
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

METHODS = ("leapalign", "refl", "draft_lv", "drtune", "alignprop", "grpo")


def build(args: argparse.Namespace):
    from leapalign_jax import config_lib
    from leapalign_jax.world import build_world

    if args.world == "shapes":
        config = config_lib.load_config(os.path.join(REPO, "configs", "toy_leapalign.py"))
        if args.cache_dir:
            config.world.cache_dir = args.cache_dir
        config.world.num_steps = config.world.eval_steps = args.num_steps
    else:
        config = config_lib.load_config(os.path.join(REPO, "configs", "random_flux.py"))
        config.world.num_steps = args.num_steps
    config.train.batch_size = args.batch_size
    config.seed = args.seed
    return config, build_world(config)


def method_config(name: str, batch_size: int):
    from leapalign_jax import methods

    cfg = methods.default_config(name)
    if name == "grpo":  # groups that divide the batch
        cfg.group_size = max(d for d in range(2, cfg.group_size + 1) if batch_size % d == 0)
    return cfg


def update_direction(world, name: str, batches: int, seed: int, batch_size: int) -> Any:
    """The mean loss gradient over `batches` training batches, at unit global norm."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import optax

    from leapalign_jax import methods

    cfg = ml_collections.FrozenConfigDict(method_config(name, batch_size))
    loss_fn = methods.get_loss(name)
    grad_fn = jax.jit(jax.grad(lambda p, f, b, k: loss_fn(p, f, b, k, world.pipe, cfg)[0]))
    frozen = world.frozen
    if methods.needs_reference(cfg):
        frozen = dict(frozen, reference=world.params)
    total = None
    for i in range(batches):
        batch = jax.tree.map(jnp.asarray, world.train_batch(i))
        g = grad_fn(world.params, frozen, batch, jax.random.key(seed * 1000 + i))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    norm = optax.global_norm(total)
    return jax.tree.map(lambda x: x / norm, total), float(norm) / batches


def random_direction(world, seed: int) -> Any:
    """A random unit direction in parameter space: the network's own sensitivity profile,
    against which a method's profile is read."""
    import jax
    import optax

    leaves, tree = jax.tree.flatten(world.params)
    keys = jax.random.split(jax.random.key(seed + 777), len(leaves))
    g = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, x.dtype)
                                  for k, x in zip(keys, leaves)])
    norm = optax.global_norm(g)
    return jax.tree.map(lambda x: x / norm, g)


def trajectory(world, seed: int):
    """The base model's latents x_0 .. x_{T-1} on the evaluation batch, (T, B, L, C)."""
    import jax
    import jax.numpy as jnp

    from leapalign_jax import flow
    from leapalign_jax.pipeline import conditioned_velocity, initial_noise

    pipe, batch = world.pipe, jax.tree.map(jnp.asarray, world.eval_batch)
    x0 = initial_noise(jax.random.key(seed + 12345), batch, pipe)
    b, t = x0.shape[0], pipe.num_steps
    keep = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    velocity = conditioned_velocity(pipe, batch)
    _, kept = jax.jit(lambda p, x: flow.euler_rollout(velocity, p, x, pipe.sigmas,
                                                      keep=keep))(world.params, x0)
    return jnp.moveaxis(kept, 1, 0), batch


def velocity_effects_fn(world, latents, batch):
    """`direction -> effect_t` (T,), the RMS of the velocity's directional derivative at
    each step; compiled once and reused for every method's direction."""
    import jax
    import jax.numpy as jnp

    pipe = world.pipe
    sigmas = jnp.asarray(pipe.sigmas, jnp.float32)[:pipe.num_steps]

    def one_step(params, g, x, s):
        sigma = jnp.full((x.shape[0],), s, jnp.float32)
        _, dv = jax.jvp(lambda p: pipe.velocity(p, x, sigma, batch["cond"]), (params,), (g,))
        return jnp.sqrt(jnp.mean(jnp.square(dv)))

    effects = jax.jit(lambda params, g: jax.lax.map(
        lambda xs: one_step(params, g, *xs), (latents, sigmas)))
    return lambda direction: np.asarray(effects(world.params, direction), np.float64)


def category_gains(path: str) -> dict[str, dict[str, float]]:
    """method -> {position, color_attr, overall}: held-out accuracy gain over the base,
    mean over seeds, from a compare_methods.py results.json."""
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    base = results["base"]["points"][0]["results"]
    keys = ("position", "color_attr", "overall")
    return {name: {k: row[f"acc_{k}"]["mean"] - base[f"acc_{k}"] for k in keys}
            for name, row in results["summary"].items()}


def plot(profiles: dict[str, np.ndarray], sigmas: np.ndarray, path: str,
         gains: dict[str, dict[str, float]] | None = None) -> None:
    """The share profile per method; with gains, beside it each method's early share
    against its held-out position and color_attr gains (the paper's question: does
    reaching the early steps fix layout and binding?)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if gains else 1, figsize=(11.5 if gains else 6.4, 4.0),
                             dpi=120, squeeze=False)
    ax = axes[0, 0]
    for name, share in profiles.items():
        ax.plot(sigmas[:len(share)], share, marker="o", ms=3, label=name)
    ax.invert_xaxis()
    ax.set_xlabel("noise level sigma_t of the step (sampling runs left to right)")
    ax.set_ylabel("share of the update's effect on v")
    ax.set_title("Where each method's first update changes the velocity")
    ax.axvline(0.5, color="gray", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    if gains:
        ax = axes[0, 1]
        early = sigmas[:len(next(iter(profiles.values())))] > 0.5
        for category, marker in (("position", "o"), ("color_attr", "s")):
            named = [n for n in profiles if n in gains]
            x = [profiles[n][early].sum() for n in named]
            y = [gains[n][category] for n in named]
            ax.scatter(x, y, marker=marker, label=f"{category} gain")
            for n, xi, yi in zip(named, x, y):
                ax.annotate(n, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(profiles["random direction"][early].sum(), color="gray", lw=0.8, ls="--")
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set_xlabel("share of the effect at sigma > 0.5 (dashed: a random direction's)")
        ax.set_ylabel("held-out accuracy gain over the base")
        ax.set_title("Reaching the early steps vs layout and binding gains")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=("shapes", "random_flux"), default="shapes")
    parser.add_argument("--cache-dir", default="", help="shapes world cache (built if empty)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--num-steps", type=int, default=10, help="rollout steps T")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4, help="gradients averaged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-results", default="",
                        help="compare_methods.py results.json for the category gains")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                      "mechanism"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    config, world = build(args)
    latents, batch = trajectory(world, args.seed)
    sigmas = np.asarray(world.pipe.sigmas, np.float32)[:-1]
    velocity_effects = velocity_effects_fn(world, latents, batch)
    profiles, raw, norms = {}, {}, {}
    for name in args.methods:
        direction, norms[name] = update_direction(world, name, args.batches, args.seed,
                                                  args.batch_size)
        effects = velocity_effects(direction)
        raw[name] = effects
        profiles[name] = effects ** 2 / np.sum(effects ** 2)
        print(f"{name}: early share {profiles[name][sigmas > 0.5].sum():.3f}", flush=True)
    effects = velocity_effects(random_direction(world, args.seed))
    raw["random direction"] = effects
    profiles["random direction"] = effects ** 2 / np.sum(effects ** 2)
    gains = category_gains(args.compare_results) if args.compare_results else {}
    early = sigmas > 0.5
    baseline = profiles["random direction"][early].sum()

    header = ("| method | share at sigma > 0.5 | / random direction's | share at sigma > 0.8 | "
              "share of the first step |")
    rule = "|---|---:|---:|---:|---:|"
    if gains:
        header += " position gain | color_attr gain | overall gain |"
        rule += "---:|---:|---:|"
    lines = [header, rule]
    for name, share in profiles.items():
        row = (f"| {name} | {share[early].sum():.3f} | {share[early].sum() / baseline:.2f} "
               f"| {share[sigmas > 0.8].sum():.3f} | {share[0]:.3f} |")
        if gains:
            g = gains.get(name, {})
            row += "".join(f" {g[k]:+.3f} |" if k in g else " - |"
                           for k in ("position", "color_attr", "overall"))
        lines.append(row)
    steps = "| method | " + " | ".join(f"{s:.2f}" for s in sigmas) + " |"
    steps_rule = "|---|" + "---:|" * len(sigmas)
    per_step = [steps, steps_rule] + [
        f"| {name} | " + " | ".join(f"{v:.3f}" for v in share) + " |"
        for name, share in profiles.items()]
    command = "python " + " ".join([os.path.relpath(__file__, REPO)] + (argv or sys.argv[1:]))
    report = "\n".join([
        "# Where each method's update acts along the trajectory", "",
        f"`{command}` on {platform.machine()} ({os.cpu_count()} CPUs), {time.time() - t0:.0f} s.",
        "", f"World {args.world}, T = {args.num_steps}, the direction of each method's first "
        f"update (gradient at the base params, mean of {args.batches} batches of "
        f"{args.batch_size}, seed {args.seed}); its effect on the velocity at each step of "
        f"the base model's trajectory on {latents.shape[1]} held-out grid prompts. Share = "
        "effect_t^2 / sum_t effect_t^2 (benchmarks/mechanism.py docstring). The random "
        "direction (a unit Gaussian direction in parameter space) gives the network's own "
        "sensitivity profile: a method above it at sigma > 0.5 aims its update at the "
        "early steps more than chance.", "",
        *lines, "", "Share per step (columns: sigma_t of the step, sampling order):", "",
        *per_step, ""])
    with open(os.path.join(args.out, "mechanism.md"), "w", encoding="utf-8") as f:
        f.write(report)
    with open(os.path.join(args.out, "mechanism.json"), "w", encoding="utf-8") as f:
        json.dump({"command": command, "sigmas": sigmas.tolist(),
                   "effects": {k: v.tolist() for k, v in raw.items()},
                   "shares": {k: v.tolist() for k, v in profiles.items()},
                   "gradient_norms": norms, "gains": gains}, f, indent=1)
    plot(profiles, sigmas, os.path.join(args.out, "mechanism.png"), gains)
    print(report)


if __name__ == "__main__":
    main()
