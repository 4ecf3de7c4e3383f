"""task=plan: the abstract compile equals the trainer's real one; fit errors; FLOP counting."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leapalign_jax import config_lib, parallel, plan, train
from leapalign_jax.world import build_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**plan_knobs):
    config = config_lib.load_config(os.path.join(ROOT, "configs", "random_flux.py"))
    config.world.num_steps = 2
    config.world.model.depth = 0  # one single-stream block: the fewest ops to compile
    config.train.batch_size = 2
    config.plan = plan.plan_config()
    config.plan.update(plan_knobs)
    return config


@pytest.fixture(scope="module")
def tiny_plan():
    return plan.compute_plan(tiny_config())


def trainer_compiled(config):
    """The step as `train.train_and_evaluate` builds it, on the world's real params."""
    world = build_world(config)
    mesh, rules = train.mesh_and_rules(config)
    optimizer = train.make_optimizer(config.optim)
    shardings = train.state_shardings(world, optimizer, mesh, rules)
    state = jax.jit(lambda p: train.create_train_state(p, optimizer, config.seed),
                    out_shardings=shardings)(world.params)
    frozen, frozen_sh = train.place_frozen(config, world, mesh, rules, shardings)
    batch_sh = jax.tree.map(
        lambda x: parallel.batch_sharding(mesh) if np.ndim(x) else parallel.replicated(mesh),
        world.train_batch(0))
    step_fn = jax.jit(
        train.make_train_step(world.pipe, config.method, optimizer, config.optim.ema_decay,
                              config.optim.grad_clip, world.assemble),
        in_shardings=(shardings, frozen_sh, batch_sh),
        out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))
    batch = parallel.shard_batch(world.train_batch(0), mesh)
    lowered = step_fn.lower(state, frozen, batch)
    # The plan compiles with LLVM optimisations off; memory and cost analyses do not depend
    # on them, and the same options let this compile reuse the plan's from the cache.
    return world, lowered.compile(compiler_options=plan.FAST_CPU_COMPILE)


def test_plan_equals_the_trainers_compiled_step(tiny_plan):
    world, compiled = trainer_compiled(tiny_config())
    mem = compiled.memory_analysis()
    c = tiny_plan["compiled"]
    assert (c["arguments"], c["output"], c["alias"], c["temp"]) == (
        mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
        mem.temp_size_in_bytes)
    assert c["temp"] > 0 and c["alias"] > 0  # the state is donated, as in the trainer
    assert c["cost_flops"] == pytest.approx(compiled.cost_analysis()["flops"])
    # The arguments are the state's parts, the batch and the frozen tree, less the unused
    # `prompt_id` (2 int32) that jit prunes.
    assert c["params"] + c["optimizer"] + c["ema"] + c["state_other"] + c["batch_bytes"] \
        + c["frozen"] - c["arguments"] == 2 * 4


def test_lora_plan_equals_the_trainers_compiled_step():
    """With LoRA the plan compiles the trainer's adapter step: adapters in the state, the
    base in the frozen tree, the same buffers as the step the trainer compiles."""
    config = tiny_config()
    config.lora.update(dict(enabled=True, rank=2))
    lora_plan = plan.compute_plan(config)
    world, compiled = trainer_compiled(config)
    mem = compiled.memory_analysis()
    c = lora_plan["compiled"]
    assert (c["arguments"], c["output"], c["alias"], c["temp"]) == (
        mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
        mem.temp_size_in_bytes)
    adapters = sum(math.prod(x.shape) for x in jax.tree.leaves(world.params))
    base = sum(math.prod(x.shape) for x in jax.tree.leaves(world.frozen["base"]))
    assert lora_plan["param_count"] == adapters < base / 3
    assert c["params"] == c["ema"] == 4 * adapters
    assert c["frozen"] == 4 * base


def test_analytic_param_bytes_are_the_real_param_count_times_four(tiny_plan):
    world = build_world(tiny_config())
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(world.params))
    assert tiny_plan["param_count"] == count
    assert tiny_plan["analytic"]["params"] == 4 * count
    assert tiny_plan["compiled"]["params"] == 4 * count  # one device holds all of them
    assert tiny_plan["compiled"]["ema"] == 4 * count


def test_flops_add_the_rollout_trips_cost_analysis_counts_once(tiny_plan):
    t = tiny_plan["num_steps"]
    c = tiny_plan["compiled"]
    # The rollout scan's body is one velocity call: T - 1 further trips of it are added.
    assert tiny_plan["loop_extra_flops"] > 0
    assert c["jaxpr_flops"] - c["jaxpr_flops_once"] == pytest.approx(
        tiny_plan["loop_extra_flops"])
    assert tiny_plan["flops_per_device"] == pytest.approx(c["cost_flops"]
                                                          + tiny_plan["loop_extra_flops"])
    assert t == 2
    times = tiny_plan["seconds_per_iter"]
    assert times["v5p"] == pytest.approx(tiny_plan["flops_per_device"] / (0.4 * 459e12))
    assert times["h100"] == pytest.approx(times["h200"])


def test_matmul_flops_multiply_scan_bodies():
    def f(w, x):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)[0]

    w, x = jnp.ones((8, 8)), jnp.ones((4, 8))
    total, once, unknown = plan.matmul_flops(jax.make_jaxpr(f)(w, x))
    assert (total, once, unknown) == (5 * 2 * 4 * 8 * 8, 2 * 4 * 8 * 8, 0)
    # Loop-free, the count equals XLA's cost analysis up to the elementwise ops.
    g = jax.jit(lambda w, x: x @ w @ w)
    assert plan.matmul_flops(jax.make_jaxpr(g)(w, x))[0] == pytest.approx(
        g.lower(w, x).compile().cost_analysis()["flops"], rel=0.05)


def test_over_budget_stops_with_one_line_naming_the_largest_term(tiny_plan):
    with pytest.raises(ValueError) as err:
        plan.check_fit(tiny_plan, "v5p", hbm_gib=1e-5)
    message = str(err.value)
    assert "\n" not in message
    assert "v5p" in message and "largest term is" in message
    terms = plan.memory_terms(tiny_plan)
    assert max(terms, key=terms.get) in message
    plan.check_fit(tiny_plan, "v5p", hbm_gib=95)  # a tiny model fits
    with pytest.raises(ValueError, match=r"\(analytic\) but v5p"):
        plan.check_fit(tiny_plan, "v5p", hbm_gib=1e-5, fit_on="analytic")


@pytest.mark.parametrize("term, fix", [("temp", "remat=full"),
                                       ("optimizer", "fsdp axis")])
def test_fit_error_names_the_fix_of_the_largest_term(tiny_plan, term, fix):
    fake = {**tiny_plan, "compiled": dict(tiny_plan["compiled"]),
            "analytic": dict(tiny_plan["analytic"], gradients=0.0)}
    fake["compiled"][term] = 200 * plan.GIB
    fake["compiled"]["peak"] = 300 * plan.GIB
    with pytest.raises(ValueError, match=fix):
        plan.check_fit(fake, "v5p", hbm_gib=95)


def test_run_plan_raises_for_a_chip_it_does_not_fit(tiny_plan, capsys, monkeypatch):
    monkeypatch.setattr(plan, "compute_plan", lambda config: tiny_plan)
    with pytest.raises(ValueError, match=r"needs .* GiB per device \(compiled\) but v5p allows"):
        plan.run_plan(tiny_config(chip="v5p", hbm_gib=1e-5))
    assert "| **peak**" in capsys.readouterr().out  # the report is printed first


def test_a_larger_mesh_is_compiled_on_simulated_devices(tiny_plan):
    config = tiny_config()
    config.mesh.shape = [1, 2, 1]
    result = plan.compute_plan(config)
    assert result["devices"] == 2 and "2 simulated devices" in result["backend"]
    one = tiny_plan
    # FSDP halves every kernel split along "embed" (the tiny model's odd leaves replicate).
    assert one["compiled"]["params"] / 2 <= result["compiled"]["params"] \
        < one["compiled"]["params"]
