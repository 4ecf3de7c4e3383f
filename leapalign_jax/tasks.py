"""The tasks `main.py` dispatches on `config.task`: train, sample, evaluate, embed, plan,
export.

Each task builds the world, then calls the trainer, the sampler or the world's evaluator.
Inference tasks read only the EMA params of the newest checkpoint (`checkpoint.
restore_params`), never the optimizer state, and never move or change a checkpoint.
Every process of a pod runs the same task; process 0 writes the shared files and the
console lines (one per evaluation, then the table).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from leapalign_jax import checkpoint, evaluate, flux_world, paths, plan, sampling, train
from leapalign_jax.models import lora
from leapalign_jax.models.flux import unstack_blocks
from leapalign_jax.weights import flux as flux_weights
from leapalign_jax.pipeline import Params, World
from leapalign_jax.world import build_world

TASKS = ("train", "sample", "evaluate", "embed", "plan", "export")


def latest_params(config: ml_collections.ConfigDict, workdir: str, world: World,
                  field: str = "ema_params") -> tuple[Params, int]:
    """The EMA params (or `field`) of the newest checkpoint in `workdir`, or the world's
    initial params at step 0 when there is none."""
    shardings = train.param_shardings(config, world)
    restored = checkpoint.restore_params(workdir, world.params, shardings, field)
    if restored is None:
        logging.info("no checkpoint in %s: using the initial params", workdir)
        return world.params, 0
    return restored


def evaluate_once(world: World, params: Params, workdir: str, name: str) -> dict[str, Any]:
    """`world.evaluate` into DIR/eval/<name>/, or its results.json when that folder is
    complete already (a resumed run); one console line either way."""
    out_dir = paths.join(workdir, "eval", name)
    results = evaluate.read_results(out_dir)
    if results is None:
        results = world.evaluate(params, out_dir)
        logging.info("evaluation %s: %s", name, results)
    train.console(evaluate.summary(name, results) + f" ({out_dir})")
    return results


def train_and_report(config: ml_collections.ConfigDict, workdir: str,
                     hooks: tuple[train.Hook, ...] = ()) -> dict[str, dict]:
    """Trains, then (for worlds with an evaluator) writes and prints a before/after table
    of the base model and the aligned EMA params on the world's held-out prompts."""
    world = build_world(config)
    rows: dict[str, dict] = {}
    if world.evaluate is not None:
        rows["base"] = evaluate_once(world, world.params, workdir, "base")
    if world.evaluate is not None and config.train.eval_every:
        hooks = (*hooks, train.Hook(_evaluation_hook(world, workdir), config.train.eval_every))
    state = train.train_and_evaluate(config, workdir, world, hooks)
    if world.evaluate is not None:
        step = int(jax.device_get(state.step))
        rows[f"{config.method.name} (step {step})"] = evaluate_once(
            world, state.ema_params, workdir, f"step_{step:06d}")
        if paths.is_writer():
            table = evaluate.format_table(rows)
            paths.write_text(paths.join(workdir, "results.md"), table + "\n")
            print(table)
    return rows


def _evaluation_hook(world: World, workdir: str):
    """A train hook evaluating the EMA params mid-run; its scalars go to TensorBoard."""

    def hook(step: int, state: train.TrainState, metrics: dict) -> dict[str, float]:
        del metrics
        results = evaluate_once(world, state.ema_params, workdir, f"step_{step:06d}")
        return {f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))}

    return hook


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Samples the world's evaluation prompts with the latest EMA params; returns the PNG."""
    world = build_world(config)
    params, step = latest_params(config, workdir, world)
    mesh, _ = train.mesh_and_rules(config)
    images = sampling.on_mesh(sampling.make_sample_fn(world.pipe), mesh,
                              world.velocity_params(params, world.frozen), world.frozen,
                              world.eval_batch, jax.random.key(config.seed))
    path = paths.join(workdir, "samples", f"{step:06d}.png")
    if paths.is_writer():
        sampling.save_grid(images, path, captions=world.eval_prompts)
        for i, image in enumerate(images):  # each image too, full size
            sampling.save_image(image, paths.join(workdir, "samples", f"{step:06d}",
                                                  f"{i:03d}.png"))
        logging.info("wrote %s", path)
        print(path)
    paths.barrier("sample")
    return path


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluates the latest EMA params in `workdir` (the base model if it has none)."""
    world = build_world(config)
    if world.evaluate is None:
        raise ValueError(f"world {config.world.name!r} has no evaluation; use "
                         "--config.task=sample for image grids")
    params, step = latest_params(config, workdir, world)
    name = config.get("eval_name") or f"step_{step:06d}"
    results = world.evaluate(params, paths.join(workdir, "eval", name))
    logging.info("evaluation %s: %s", name, results)
    if paths.is_writer():
        print(evaluate.format_table({name: results}))
    return results


def _host(x: jax.Array) -> np.ndarray:
    """The whole array on this host (gathered from the other processes on a pod)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def export(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str | None]:
    """Writes the newest EMA params as FLUX.1 weights: a diffusers `transformer/` folder
    and a BFL `flux.safetensors`, both read by `weights.flux.load_flux` and diffusers.

    LoRA adapters are merged into the base (`W + (alpha / r) A @ B`). The files go to
    `config.export_dir` (default DIR/export/step_<N>), a local folder that must not exist
    yet; they are written to a temporary folder beside it and renamed, so an interrupted
    export leaves nothing half-written. A model diffusers cannot describe (mlp_ratio other
    than 4) gets the BFL file only. Returns the paths written ("diffusers": None then).
    """
    world = build_world(config)
    if world.model is None:
        raise ValueError(f"world {config.world.name!r} has no Flux generator to export; "
                         "use the random_flux, shapes or flux world")
    params, step = latest_params(config, workdir, world)
    if world.assemble is not None:
        params = jax.jit(lambda p, f: lora.merge(f["base"], p, config.lora))(
            params, world.frozen)
    model = world.model
    if model.scan_blocks:  # the files hold one tensor per block
        params = unstack_blocks(params, model)
        model = dataclasses.replace(model, scan_blocks=False)
    out = config.get("export_dir") or paths.join(workdir, "export", f"step_{step:06d}")
    if paths.is_remote(out):
        raise ValueError(f"export folder {out} is remote; set --config.export_dir to a local "
                         "folder and copy it (gsutil -m cp -r) afterwards")
    if os.path.exists(out):
        raise FileExistsError(f"export folder {out} exists; move it away or set "
                              "--config.export_dir to a new folder")
    dtype = config.get("export_dtype") or None
    host = jax.tree.map(_host, params)
    written = {"diffusers": None, "bfl": os.path.join(out, "flux.safetensors")}
    if paths.is_writer():
        parent = os.path.dirname(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
        try:
            flux_weights.save_flux_bfl(os.path.join(tmp, "flux.safetensors"), model,
                                       host, dtype=dtype)
            if model.mlp_ratio == 4.0:
                flux_weights.save_flux_diffusers(os.path.join(tmp, "transformer"),
                                                 model, host, dtype=dtype)
                written["diffusers"] = os.path.join(out, "transformer")
            else:
                logging.warning("mlp_ratio %s has no diffusers FluxTransformer2DModel: "
                                "wrote the BFL file only", model.mlp_ratio)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        train.console(f"exported step {step} to {out}")
    elif model.mlp_ratio == 4.0:
        written["diffusers"] = os.path.join(out, "transformer")
    paths.barrier("export")
    return written


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Runs `config.task` in `workdir` (the config is already validated)."""
    if config.task == "train":
        return train_and_report(config, workdir)
    if config.task == "sample":
        return sample(config, workdir)
    if config.task == "evaluate":
        return evaluate_checkpoint(config, workdir)
    if config.task == "embed":  # FLUX.1 prompt embeddings into workdir/embeddings/
        return flux_world.embed(config, workdir)
    if config.task == "plan":  # memory and speed of the train step, before launch
        return plan.run_plan(config)
    if config.task == "export":  # merged weights as a diffusers folder and a BFL file
        return export(config, workdir)
    raise ValueError(f"config.task={config.task!r}: use one of {TASKS}")
