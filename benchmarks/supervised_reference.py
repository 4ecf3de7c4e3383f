"""How far the shapes world's generator moves when fine-tuned on correct images directly.

    python benchmarks/supervised_reference.py [--steps 300] [--batch-size 64]
        [--learning-rates 3e-5 1e-4] [--eval-every 100] [--out benchmarks/results/supervised]

Reward alignment plateaus near +0.08 held-out accuracy on this world whatever the method,
learning rate, schedule or reward variant (benchmarks/results/). This asks whether the
reward or the generator is the limit: the same generator (text encoder frozen, as in
alignment) is fine-tuned with its own rectified-flow pretraining loss on exact renders of
train prompts (a random scene that satisfies each prompt: images the checker accepts),
with alignment's optimizer (AdamW after global-norm clipping, the EMA evaluated), batch
and iteration budget, and evaluated on the same held-out prompts, checker and FD as every
method. It is a reference, not a method: it reads the scene renderer, which no alignment
method can. Beside it, the base's accuracy
when any of N samples of a prompt may pass (the checker picks): how much of the task lies
in what the base already samples, which a method that concentrates the base's mass could
reach.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from leapalign_jax import config_lib, flow, sampling, train  # noqa: E402
from leapalign_jax.models.flux import Flux  # noqa: E402
from leapalign_jax.toy import (autoencoder, checker, pretrain, prompts, scenes,  # noqa: E402
                               tokenizer)
from leapalign_jax.toy import world as shapes_world  # noqa: E402
from leapalign_jax.world import build_world  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finetune(config, world, models, lr: float, args) -> list[dict]:
    """Fine-tunes the generator's Flux on exact renders with the trainer's optimizer, clip
    and EMA; evaluates the EMA params every `eval_every` steps, as the trainer does."""
    wc = config.world
    flux = Flux(pretrain.flux_config(wc.model))
    text = pretrain.text_encoder(wc.model)
    vae, text_params = models["vae"], models["generator"]["text"]
    optim = config.optim.copy_and_resolve_references()
    optim.learning_rate = lr
    tx, decay = train.make_optimizer(optim), optim.ema_decay

    @jax.jit
    def step(params, ema, opt_state, images, ids, rng):
        latents = flow.pack_latents(autoencoder.encode(vae, images), patch_size=pretrain.PATCH)
        loss, grads = jax.value_and_grad(lambda p: pretrain.rectified_flow_loss(
            {"flux": p, "text": text_params}, latents, ids, rng, flux, text))(params)
        grads, _ = optax.clip_by_global_norm(optim.grad_clip).update(grads, None)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
        return params, ema, opt_state, loss

    params = ema = world.params
    opt_state = tx.init(params)
    data = np.random.default_rng(config.seed)
    points, train_s = [], 0.0
    for i in range(1, args.steps + 1):
        chosen, drawn = prompts.sample_pairs(data, args.batch_size, prompts.train_prompts())
        images, ids = scenes.render_batch(drawn), tokenizer.encode([p.text for p in chosen])
        t0 = time.perf_counter()
        params, ema, opt_state, loss = step(params, ema, opt_state, images, ids,
                                            jax.random.fold_in(jax.random.key(config.seed), i))
        loss = float(loss)
        train_s += time.perf_counter() - t0
        if i % args.eval_every == 0 or i == args.steps:
            with tempfile.TemporaryDirectory() as out:
                results = world.evaluate(ema, out)
            points.append({"step": i, "train_s": train_s, "loss": loss, "results": results})
            print(json.dumps({"lr": lr, "step": i, "loss": loss,
                              "acc_overall": results["acc_overall"]}), flush=True)
    return points


def best_of_n(config, models, n: int, chunk: int = 256) -> dict:
    """Checker accuracy of the base when any of `n` samples per held-out prompt may pass
    (each sample with its own noise): how much of the task lies in the base's support."""
    wc = config.world
    _, pipe, batch_of = shapes_world.make_pipeline(wc, models["generator"])
    specs = shapes_world.heldout_specs(wc.images_per_category)
    sample = sampling.make_sample_fn(pipe, flow.flux_sigmas(wc.eval_steps,
                                                            pipe.latent_shape[0]))
    frozen = {"vae": models["vae"]}
    passed = np.zeros((n, len(specs)), bool)
    for k in range(n):
        for start in range(0, len(specs), chunk):
            part = specs[start:start + chunk]
            images = np.asarray(sample(models["generator"]["flux"], frozen, batch_of(part),
                                       jax.random.fold_in(jax.random.key(5000 + k), start)))
            passed[k, start:start + len(part)] = [checker.check(im, p)
                                                  for im, p in zip(images, part)]
    return {f"acc_{c}": v for c, v in checker.summarize(passed.any(axis=0), specs).items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[3e-5, 1e-4])
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "toy_leapalign.py"))
    parser.add_argument("--best-of", type=int, default=8,
                        help="also the base's accuracy when any of N samples may pass (0: no)")
    parser.add_argument("--cache-dir", default="", help="the world's cache (default: config's)")
    parser.add_argument("--tiny", action="store_true", help="the :tiny world (smoke test)")
    parser.add_argument("--out", default="", help="folder for supervised.{json,md}")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    config = config_lib.load_config(args.config + (":tiny" if args.tiny else ""))
    config.seed = args.seed
    if args.cache_dir:
        config.world.cache_dir = args.cache_dir
    world = build_world(config)
    models = shapes_world.build_models(config.world)
    with tempfile.TemporaryDirectory() as out:
        base = world.evaluate(world.params, out)
    best = best_of_n(config, models, args.best_of) if args.best_of else None
    runs = {lr: finetune(config, world, models, lr, args) for lr in args.learning_rates}
    elapsed = time.perf_counter() - t_start

    command = "python benchmarks/supervised_reference.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}"
    cols = ["acc_overall"] + [f"acc_{c}" for c in prompts.CATEGORIES] + ["fd"]
    lines = ["# Supervised reference: the generator fine-tuned on exact renders", "",
             f"`{command}` on {machine}, seed {args.seed}, {elapsed:.0f} s in all.", "",
             f"Flux of the shipped generator (text encoder frozen), rectified-flow loss on "
             f"renders of train prompts, the trainer's AdamW, clip and EMA "
             f"({config.optim.ema_decay}, evaluated), batch {args.batch_size}; held-out evaluation "
             "as in compare_methods (25 steps, 96 images per category, the exact checker).",
             "", "| model | step | " + " | ".join(c.replace("acc_", "") for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols),
             "| base | 0 | " + " | ".join(f"{base[c]:.3f}" for c in cols) + " |"]
    if best is not None:
        lines.append(f"| base, any of {args.best_of} samples passes | 0 | "
                     + " | ".join(f"{best[c]:.3f}" for c in cols if c != "fd") + " | - |")
    for lr, points in runs.items():
        for p in points:
            lines.append(f"| supervised, lr {lr:g} | {p['step']} | "
                         + " | ".join(f"{p['results'][c]:.3f}" for c in cols) + " |")
    print("\n".join(lines))
    result = {"command": command, "machine": machine, "base": base, "best_of": best,
              "runs": {str(k): v for k, v in runs.items()}, "elapsed_s": elapsed}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "supervised.json"), "w") as f:
            json.dump(result, f, indent=1, default=float)
        with open(os.path.join(args.out, "supervised.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
