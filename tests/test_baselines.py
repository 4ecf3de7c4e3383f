"""Baseline methods: gradients on a linear velocity against hand-derived chain rules.

The velocity `v(x, sigma) = x M + (1 + sigma) b + c` with `M = A + w` is linear in x and
in the params (w, b); decode is the identity and the reward `-mean((x - target)^2)`, so
every method's gradient has a closed form written here in numpy (float64) from the
rollout latents: `dv/dw^T g = x^T g`, `dv/db^T g = (1 + sigma) sum g`, `dv/dx^T g = g M^T`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leapalign_jax import flow, methods
from leapalign_jax.methods import alignprop, drtune, grpo, refl
from leapalign_jax.pipeline import Pipeline

B, L, C, T = 2, 3, 2, 6
SIGMAS = flow.flux_sigmas(T, shift=3.0)  # uneven steps, so step sizes matter
_rs = np.random.default_rng(0)
A = (0.3 * _rs.standard_normal((C, C))).astype(np.float32)
TARGET = _rs.standard_normal((L, C)).astype(np.float32)
PARAMS = {"w": (0.2 * _rs.standard_normal((C, C))).astype(np.float32),
          "b": (0.2 * _rs.standard_normal(C)).astype(np.float32)}
BATCH = {"cond": _rs.standard_normal((B, C)).astype(np.float32)}
M = (A + PARAMS["w"]).astype(np.float64)


def linear_velocity(params, x, sigma, cond):
    return x @ (A + params["w"]) + (1.0 + sigma)[:, None, None] * params["b"] + cond[:, None]


def quadratic_reward(frozen, images, batch):
    del frozen, batch
    return -jnp.mean((images - TARGET) ** 2, axis=(1, 2))


PIPE = Pipeline(velocity=linear_velocity, decode=lambda frozen, x: x, reward=quadratic_reward,
                sigmas=SIGMAS, latent_shape=(L, C))


def config(name, **overrides):
    cfg = methods.default_config(name)
    cfg.hinge_lambda = 100.0  # hinge always active: dloss/dr = -1/B
    cfg.update(overrides)
    return cfg


def method_grad(name, cfg, rng, pipe=PIPE, batch=BATCH):
    fn = lambda p: methods.get_loss(name)(p, {}, batch, rng, pipe, cfg)  # noqa: E731
    (value, metrics), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(PARAMS)
    return value, metrics, grads


# ------------------------------------------------------------- closed forms in numpy


def v_np(x, sigma):
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), (x.shape[0],))
    return (x @ M + (1.0 + sigma)[:, None, None] * PARAMS["b"].astype(np.float64)
            + BATCH["cond"].astype(np.float64)[:, None])


def rollout_np(x0, sigmas):
    xs = [np.asarray(x0, np.float64)]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        xs.append(xs[-1] + (float(s_next) - float(s)) * v_np(xs[-1], s))
    return xs


def dloss_dx(x):
    """d/dx of mean_b (lambda - r_b) with r = -mean((x - target)^2)."""
    return 2.0 * (x - TARGET) / (x.shape[0] * L * C)


def dv_dparams(x, sigma, g):
    """(dv/dtheta)^T g summed over the batch; sigma scalar or (B,)."""
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), (x.shape[0],))
    return {"w": np.einsum("blc,bld->cd", x, g),
            "b": np.einsum("b,bld->d", 1.0 + sigma, g)}


def add(a, b):
    return {k: a[k] + b[k] for k in a}


def chain_grad(xs, lam, first_step):
    """Adjoint through Euler steps first_step .. T-1: lam_i = lam_{i+1} (I + ds M)^T."""
    total = {"w": np.zeros((C, C)), "b": np.zeros(C)}
    for i in range(T - 1, first_step - 1, -1):
        ds = float(SIGMAS[i + 1]) - float(SIGMAS[i])
        total = add(total, dv_dparams(xs[i], SIGMAS[i], ds * lam))
        lam = lam + ds * lam @ M.T
    return total


def assert_grads(actual, expected, rtol=2e-4, atol=1e-6):
    for k in expected:
        np.testing.assert_allclose(np.asarray(actual[k]), expected[k], rtol=rtol, atol=atol,
                                   err_msg=k)


def grads_differ(a, b, tol=1e-4):
    return any(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k]))) > tol for k in a)


# ------------------------------------------------------------------------- ReFL


def test_refl_gradient_is_the_single_step_term():
    cfg = config("refl", last_m=4)
    rng = jax.random.key(1)
    _, grads = jax.value_and_grad(
        lambda p: refl.loss(p, {}, BATCH, rng, PIPE, cfg)[0])(PARAMS)
    rng_noise, rng_steps = jax.random.split(rng)
    k = np.asarray(refl.sample_steps(rng_steps, B, T, 4))
    assert np.all((k >= T - 4) & (k < T))
    xs = rollout_np(jax.random.normal(rng_noise, (B, L, C)), SIGMAS)
    x_k = np.stack([xs[k[b]][b] for b in range(B)])
    s_k = SIGMAS[k].astype(np.float64)
    x_hat = x_k - s_k[:, None, None] * v_np(x_k, s_k)
    expected = dv_dparams(x_k, s_k, -s_k[:, None, None] * dloss_dx(x_hat))
    assert_grads(grads, expected)


def test_refl_ignores_the_gradient_path_of_other_steps():
    """Same velocity values, different parameter gradients away from step k: no change."""
    cfg = config("refl", last_m=4)
    rng = jax.random.key(2)
    k = np.asarray(refl.sample_steps(jax.random.split(rng)[1], B, T, 4))
    sigma_k = jnp.asarray(SIGMAS[k])

    def perturbed(gate_all):
        def velocity(params, x, sigma, cond):
            extra = 5.0 * jnp.sin(x @ params["w"]) + params["b"] ** 2
            gate = jnp.ones_like(sigma) if gate_all else (sigma != sigma_k).astype(x.dtype)
            return linear_velocity(params, x, sigma, cond) + \
                gate[:, None, None] * (extra - jax.lax.stop_gradient(extra))
        return Pipeline(velocity, PIPE.decode, PIPE.reward, SIGMAS, (L, C))

    _, _, base = method_grad("refl", cfg, rng)
    v_other, _, other = method_grad("refl", cfg, rng, pipe=perturbed(False))
    v_all, _, every = method_grad("refl", cfg, rng, pipe=perturbed(True))
    assert_grads(other, {k_: np.asarray(v) for k_, v in base.items()}, rtol=1e-6)
    assert grads_differ(every, base)  # the perturbation is seen where it does matter


# ------------------------------------------------------------------------- DRaFT


@pytest.mark.parametrize("k", [1, 3])
def test_draft_k_gradient_is_the_chain_through_the_last_k_steps(k):
    rng = jax.random.key(3)
    _, _, grads = method_grad("draft", config("draft", k=k), rng)
    xs = rollout_np(jax.random.normal(rng, (B, L, C)), SIGMAS)
    expected = chain_grad(xs, dloss_dx(xs[-1]), T - k)
    assert_grads(grads, expected)
    if k == 1:  # DRaFT-1: just (sigma_T - sigma_{T-1}) dv/dtheta(x_{T-1})
        ds = float(SIGMAS[T]) - float(SIGMAS[T - 1])
        assert_grads(grads, dv_dparams(xs[T - 1], SIGMAS[T - 1], ds * dloss_dx(xs[-1])))
    else:
        assert grads_differ(grads, chain_grad(xs, dloss_dx(xs[-1]), T - 1))


def test_draft_lv_value_and_gradient_average_the_copies():
    n = 3
    rng = jax.random.key(4)
    value, metrics, grads = method_grad("draft_lv", config("draft_lv", n=n), rng)
    rng_noise, rng_lv = jax.random.split(rng)
    x_clean = rollout_np(jax.random.normal(rng_noise, (B, L, C)), SIGMAS)[-1]
    s = float(SIGMAS[T - 1])
    rewards, expected = [], {"w": 0.0, "b": 0.0}
    for i in range(n):
        eps = np.asarray(jax.random.normal(jax.random.fold_in(rng_lv, i), (B, L, C)))
        x = (1.0 - s) * x_clean + s * eps
        x_hat = x - s * v_np(x, s)
        rewards.append(-np.mean((x_hat - TARGET) ** 2, axis=(1, 2)))
        expected = add(expected, dv_dparams(x, s, -s * dloss_dx(x_hat) / n))
    r = np.mean(rewards, axis=0)
    np.testing.assert_allclose(float(value), np.mean(100.0 - r), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reward_mean"]), np.mean(r), rtol=1e-4)
    assert_grads(grads, expected)


def test_draft_lv_hinge_applies_to_each_copy():
    """Copies straddling lambda: the loss is mean_i relu(lambda - r_i), not relu(lambda - mean)."""
    n = 2
    rng = jax.random.key(4)
    rng_noise, rng_lv = jax.random.split(rng)
    x_clean = rollout_np(jax.random.normal(rng_noise, (B, L, C)), SIGMAS)[-1]
    s = float(SIGMAS[T - 1])
    xs, x_hats, rewards = [], [], []
    for i in range(n):
        eps = np.asarray(jax.random.normal(jax.random.fold_in(rng_lv, i), (B, L, C)))
        xs.append((1.0 - s) * x_clean + s * eps)
        x_hats.append(xs[-1] - s * v_np(xs[-1], s))
        rewards.append(-np.mean((x_hats[-1] - TARGET) ** 2, axis=(1, 2)))
    rewards = np.stack(rewards)  # (n, B)
    lam = float(np.mean(rewards[:, 0]))  # sample 0's copies lie on both sides of lambda
    assert rewards[:, 0].min() < lam < rewards[:, 0].max()
    value, metrics, grads = method_grad("draft_lv", config("draft_lv", n=n, hinge_lambda=lam),
                                        rng)
    per_copy = np.mean(np.maximum(lam - rewards, 0.0))
    of_mean = np.mean(np.maximum(lam - rewards.mean(axis=0), 0.0))
    assert abs(per_copy - of_mean) > 1e-3  # the two readings differ here
    np.testing.assert_allclose(float(value), per_copy, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reward_mean"]), rewards.mean(), rtol=1e-4)
    expected = {"w": 0.0, "b": 0.0}
    for i in range(n):
        active = (rewards[i] < lam).astype(np.float64)[:, None, None]
        expected = add(expected, dv_dparams(xs[i], s, -s * active * dloss_dx(x_hats[i]) / n))
    assert_grads(grads, expected)


# ------------------------------------------------------------------------- DRTune


@pytest.mark.parametrize("t_min,k", [(None, 2), (3, 2), (T - 1, 3)])
def test_drtune_gradient_has_no_input_jacobian_term(t_min, k):
    rng = jax.random.key(5)
    _, _, grads = method_grad("drtune", config("drtune", k=k, t_min=t_min), rng)
    stop = T - 1 if t_min is None else t_min
    rng_noise, rng_steps = jax.random.split(rng)
    steps = np.asarray(drtune.sample_train_steps(rng_steps, B, stop + 1, k))
    assert np.all(np.diff(steps, axis=1) == (stop + 1) // k) and steps.max() <= stop
    chain = drtune.chain_sigmas(SIGMAS, stop).astype(np.float64)
    xs = rollout_np(jax.random.normal(rng_noise, (B, L, C)), chain)  # ends with the leap
    lam = dloss_dx(xs[-1])
    expected = {"w": 0.0, "b": 0.0}
    for i in range(k):
        t = steps[:, i]
        x_t = np.stack([xs[t[b]][b] for b in range(B)])
        ds = (chain[t + 1] - chain[t])[:, None, None]
        expected = add(expected, dv_dparams(x_t, chain[t], ds * lam))
    assert_grads(grads, expected)


def test_drtune_value_is_the_leap_from_t_min():
    rng = jax.random.key(6)
    value, _, _ = method_grad("drtune", config("drtune", t_min=2), rng)
    xs = rollout_np(jax.random.normal(jax.random.split(rng)[0], (B, L, C)), SIGMAS[:3])
    x_hat = xs[-1] - SIGMAS[2] * v_np(xs[-1], SIGMAS[2])
    np.testing.assert_allclose(float(value),
                               np.mean(100.0 + np.mean((x_hat - TARGET) ** 2, (1, 2))),
                               rtol=1e-5)


# ------------------------------------------------------------------------- AlignProp


def test_full_backprop_is_the_chain_rule_through_every_step_with_or_without_remat():
    rng = jax.random.key(7)
    _, _, remat = method_grad("alignprop", config("alignprop", remat=True), rng)
    _, _, plain = method_grad("alignprop", config("alignprop", remat=False), rng)
    xs = rollout_np(jax.random.normal(jax.random.split(rng)[0], (B, L, C)), SIGMAS)
    assert_grads(plain, chain_grad(xs, dloss_dx(xs[-1]), 0))
    assert_grads(remat, {k: np.asarray(v) for k, v in plain.items()}, rtol=1e-6)


def test_full_backprop_closed_form_product_of_step_jacobians():
    """dx_T/db through all steps: sum_i (1 + s_i) ds_i prod_{j>i} (I + ds_j M)."""
    x0 = jnp.asarray(_rs.standard_normal((1, L, C)), jnp.float32)
    cond = jnp.zeros((1, C))
    jac = jax.jacobian(lambda b: flow.euler_chain(
        lambda p, x, s: linear_velocity(p, x, s, cond), {"w": PARAMS["w"], "b": b}, x0,
        SIGMAS)[0, 0])(jnp.asarray(PARAMS["b"]))
    expected = np.zeros((C, C))
    for i in range(T):
        ds = float(SIGMAS[i + 1]) - float(SIGMAS[i])
        prod = np.eye(C)
        for j in range(i + 1, T):
            prod = prod @ (np.eye(C) + (float(SIGMAS[j + 1]) - float(SIGMAS[j])) * M)
        expected += (1.0 + float(SIGMAS[i])) * ds * prod
    np.testing.assert_allclose(np.asarray(jac), expected.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [8, 9])  # K' = 3 and 4 of 6
def test_alignprop_truncation_keeps_the_last_k_steps(seed):
    rng = jax.random.key(seed)
    _, metrics, grads = method_grad("alignprop", config("alignprop", truncate=True), rng)
    rng_noise, rng_trunc = jax.random.split(rng)
    k = int(alignprop.sample_truncation(rng_trunc, T))
    assert 1 <= k < T and int(metrics["grad_steps"]) == k
    xs = rollout_np(jax.random.normal(rng_noise, (B, L, C)), SIGMAS)
    assert_grads(grads, chain_grad(xs, dloss_dx(xs[-1]), T - k))


def test_truncated_chain_differentiates_only_the_last_k_steps():
    """The backward pass evaluates the velocity's VJP K' times, not T times (runtime count)."""
    calls = []

    @jax.custom_vjp
    def counted(v):
        return v

    def counted_bwd(_, g):
        jax.debug.callback(lambda: calls.append(1))
        return (g,)

    counted.defvjp(lambda v: (v, None), counted_bwd)
    cond = jnp.asarray(BATCH["cond"])
    velocity = lambda p, x, s: counted(linear_velocity(p, x, s, cond))  # noqa: E731
    x0 = jax.random.normal(jax.random.key(10), (B, L, C))
    grad = jax.jit(jax.grad(lambda p, k: jnp.sum(flow.euler_chain(
        velocity, p, x0, SIGMAS, grad_from=T - k) ** 2)))
    for k in (1, 3, T):
        calls.clear()
        jax.block_until_ready(grad(PARAMS, k))
        assert len(calls) == k, (k, len(calls))
    # Without truncation every step is differentiated.
    calls.clear()
    jax.block_until_ready(jax.jit(jax.grad(lambda p: jnp.sum(flow.euler_chain(
        velocity, p, x0, SIGMAS) ** 2)))(PARAMS))
    assert len(calls) == T
    with pytest.raises(ValueError, match="remat"):
        method_grad("alignprop", config("alignprop", truncate=True, remat=False),
                    jax.random.key(0))


# ------------------------------------------------------------------------- objective


def test_objective_switch_and_errors():
    rng = jax.random.key(11)
    off, _, g_off = method_grad("refl", config("refl", hinge_lambda=-100.0), rng)
    assert float(off) == 0.0 and all(float(jnp.abs(g).max()) == 0.0 for g in g_off.values())
    neg, metrics, _ = method_grad("refl", config("refl", objective="neg_reward"), rng)
    np.testing.assert_allclose(float(neg), -float(metrics["reward_mean"]), rtol=1e-6)
    with pytest.raises(ValueError, match="objective"):
        method_grad("refl", config("refl", objective="reward"), rng)
    with pytest.raises(ValueError, match="k="):
        method_grad("draft", config("draft", k=T + 1), rng)
    with pytest.raises(ValueError, match="t_min"):
        method_grad("drtune", config("drtune", t_min=T), rng)
    for name in ("refl", "draft", "draft_lv", "drtune", "alignprop"):
        cfg = methods.default_config(name)
        assert cfg.hinge_lambda == 0.55 and cfg.objective == "hinge", name
    assert "objective" not in methods.default_config("grpo")  # GRPO ranks the raw reward


def test_registry_rows():
    assert methods.names() == sorted(methods.METHODS)
    assert set(methods.names()) == {"leapalign", "refl", "draft", "draft_lv", "drtune",
                                    "alignprop", "grpo"}
    assert methods.get_loss("draft_lv") is methods.METHODS["draft_lv"].loss
    assert methods.get_loss("refl") is refl.loss
    for name in methods.names():
        cfg = methods.default_config(name)
        assert cfg.name == name
        assert methods.needs_reference(cfg) is False, name
    cfg = methods.default_config("grpo")
    cfg.kl_coef = 0.04
    assert methods.needs_reference(cfg) is True
    for fn in (methods.get_loss, methods.default_config):
        with pytest.raises(ValueError, match="unknown method"):
            fn("ppo")


# ------------------------------------------------------------------------- GRPO


def test_sde_step_logp_is_the_gaussian_density():
    x = _rs.standard_normal((B, L, C)).astype(np.float32)
    noise = _rs.standard_normal((B, L, C)).astype(np.float32)
    sigma, sigma_next = np.array([1.0, 0.6], np.float32), np.array([0.8, 0.3], np.float32)
    sigma_max, a = 0.9, 0.7
    velocity = lambda p, x, s: linear_velocity(p, x, s, BATCH["cond"])  # noqa: E731
    x_next, logp = grpo.sde_step(velocity, PARAMS, x, sigma, sigma_next, noise,
                                 noise_level=a, sigma_max=sigma_max)
    t = sigma.astype(np.float64)[:, None, None]
    dt = sigma_next.astype(np.float64)[:, None, None] - t
    sig = a * np.sqrt(t / (1.0 - np.minimum(t, sigma_max)))  # t = 1 guarded by sigma_max
    v = v_np(x.astype(np.float64), sigma)
    mean = x + (v + sig ** 2 / (2 * t) * (x + (1 - t) * v)) * dt
    std = sig * np.sqrt(-dt)
    np.testing.assert_allclose(np.asarray(x_next), mean + std * noise, rtol=1e-5, atol=1e-5)
    z = (np.asarray(x_next, np.float64) - mean) / std
    direct = np.log(np.exp(-0.5 * z ** 2) / (std * np.sqrt(2 * np.pi))).mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(logp), direct, rtol=1e-4, atol=1e-4)
    # Scoring a recorded transition gives the same number.
    _, again = grpo.sde_step(velocity, PARAMS, x, sigma, sigma_next, noise_level=a,
                             sigma_max=sigma_max, x_next=x_next)
    np.testing.assert_allclose(np.asarray(again), np.asarray(logp), rtol=1e-6)


def test_group_advantages_are_zero_mean_per_group():
    scores = jnp.asarray(_rs.standard_normal(12), jnp.float32)
    adv = np.asarray(grpo.group_advantages(scores, 4, eps=0.0)).reshape(3, 4)
    np.testing.assert_allclose(adv.mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(adv.std(axis=1), 1.0, rtol=1e-5)
    g = np.asarray(scores).reshape(3, 4)
    np.testing.assert_allclose(adv, (g - g.mean(1, keepdims=True)) / g.std(1, keepdims=True),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="group_size"):
        grpo.group_advantages(scores, 5)


def test_grpo_objective_gradient():
    """At ratio 1 the gradient is -A / (B K); past the clip on A's side it is zero."""
    adv = jnp.asarray([1.5, -0.5])
    logp = jnp.asarray([[0.1, -0.2, 0.3], [0.0, 0.4, -0.1]])
    g = jax.grad(lambda lp: grpo.grpo_objective(lp, jax.lax.stop_gradient(lp), adv, 0.2))(logp)
    np.testing.assert_allclose(np.asarray(g), -np.repeat(np.asarray(adv)[:, None], 3, 1) / 6,
                               rtol=1e-6)
    old = logp - jnp.log(1.5)  # ratio 1.5 > 1 + 0.2
    g = jax.grad(lambda lp: grpo.grpo_objective(lp, old, adv, 0.2))(logp)
    assert float(jnp.abs(g[0]).max()) == 0.0  # A > 0, ratio clipped: no push further
    assert float(jnp.abs(g[1]).min()) > 0.0  # A < 0, ratio above the clip: still pulled back


def grpo_config(**overrides):
    return config("grpo", **{"group_size": 2, "num_train_timesteps": 3, **overrides})


def test_grpo_ratio_is_one_and_rollout_logps_match():
    batch = {"cond": _rs.standard_normal((4, C)).astype(np.float32)}
    value, metrics, grads = method_grad("grpo", grpo_config(),
                                        jax.random.key(12), batch=batch)
    assert float(metrics["ratio_mean"]) == 1.0
    assert float(metrics["clip_frac"]) == 0.0
    assert float(metrics["logp_gap"]) < 1e-4
    # Ratio 1 and zero-mean advantages: the loss value is -mean(A) = 0, the gradient not.
    assert abs(float(value)) < 1e-6
    assert max(float(jnp.abs(g).max()) for g in grads.values()) > 1e-6


def test_grpo_gradient_is_zero_when_rewards_tie_within_groups():
    batch = {"cond": _rs.standard_normal((4, C)).astype(np.float32),
             "score": np.array([0.3, 0.9, 0.2, 0.5], np.float32)}
    pipe = Pipeline(linear_velocity, PIPE.decode,
                    lambda f, images, b: b["score"] + 0.0 * jnp.sum(images, axis=(1, 2)),
                    SIGMAS, (L, C))
    # repeat_prompts: groups share the first B / G prompts, hence their scores.
    _, metrics, grads = method_grad("grpo", grpo_config(), jax.random.key(13), pipe, batch)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads.values())
    assert float(metrics["advantage_abs_mean"]) == 0.0
    # Without regrouping the four different scores give non-zero advantages.
    _, _, grads = method_grad("grpo", grpo_config(repeat_prompts=False), jax.random.key(13),
                              pipe, batch)
    assert max(float(jnp.abs(g).max()) for g in grads.values()) > 1e-6


def test_grpo_ranks_raw_rewards_even_above_lambda():
    """Every reward above lambda: the group still has non-zero advantages and a gradient."""
    batch = {"cond": _rs.standard_normal((4, C)).astype(np.float32),
             "score": np.array([0.8, 0.9, 0.7, 0.95], np.float32)}
    pipe = Pipeline(linear_velocity, PIPE.decode,
                    lambda f, images, b: b["score"] + 0.0 * jnp.sum(images, axis=(1, 2)),
                    SIGMAS, (L, C))
    cfg = grpo_config(repeat_prompts=False, hinge_lambda=0.55)
    _, metrics, grads = method_grad("grpo", cfg, jax.random.key(13), pipe, batch)
    np.testing.assert_allclose(float(metrics["advantage_abs_mean"]), 1.0, rtol=1e-2)
    assert max(float(jnp.abs(g).max()) for g in grads.values()) > 1e-6


def sde_rollout_np(x0, cond, rng_sde, a):
    """Flow-GRPO's SDE in float64 numpy, drawing step i's noise like the loss does."""
    sigma_max = float(SIGMAS[1])
    xs = [np.asarray(x0, np.float64)]
    for i in range(T - 1):
        x, t, t_next = xs[-1], float(SIGMAS[i]), float(SIGMAS[i + 1])
        mean, std = sde_mean_std_np(x, t, t_next, cond, a, sigma_max)
        noise = np.asarray(jax.random.normal(jax.random.fold_in(rng_sde, i), x.shape))
        xs.append(mean + std * noise)
    xs.append(xs[-1] + (float(SIGMAS[T]) - float(SIGMAS[T - 1])) *
              v_cond_np(xs[-1], SIGMAS[T - 1], cond))
    return xs


def v_cond_np(x, sigma, cond):
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), (x.shape[0],))
    return x @ M + (1.0 + sigma)[:, None, None] * PARAMS["b"].astype(np.float64) + \
        cond.astype(np.float64)[:, None]


def sde_mean_std_np(x, t, t_next, cond, a, sigma_max):
    dt = t_next - t
    sig = a * np.sqrt(t / (1.0 - min(t, sigma_max)))
    v = v_cond_np(x, t, cond)
    return x + (v + sig ** 2 / (2 * t) * (x + (1 - t) * v)) * dt, sig * np.sqrt(-dt)


def test_grpo_gradient_is_minus_mean_advantage_times_score():
    """grad = -mean_{b,k} A_b dlogp_bk/dtheta, A_b the group-normalised RAW reward."""
    b, g, k = 4, 4, 3
    cond = _rs.standard_normal((b, C)).astype(np.float32)
    rng = jax.random.key(14)
    rng_noise, rng_sde, rng_steps = jax.random.split(rng, 3)
    cfg = grpo_config(group_size=g, num_train_timesteps=k, repeat_prompts=False)
    a = float(cfg.noise_level)
    xs = sde_rollout_np(jax.random.normal(rng_noise, (b, L, C)), cond, rng_sde, a)
    r = -np.mean((xs[-1] - TARGET) ** 2, axis=(1, 2))
    # lambda between the rewards: a hinge on r would tie the two best samples at 0.
    cfg.hinge_lambda = float(np.mean(np.sort(r)[1:3]))
    adv = (r - r.mean()) / (r.std() + cfg.adv_eps)
    steps = np.asarray(grpo.sample_train_steps(rng_steps, b, T - 1, k))
    expected = {"w": np.zeros((C, C)), "b": np.zeros(C)}
    for i in range(b):
        for j in range(k):
            t = steps[i, j]
            x, x_next = xs[t][i:i + 1], xs[t + 1][i:i + 1]
            s, s_next = float(SIGMAS[t]), float(SIGMAS[t + 1])
            mean, std = sde_mean_std_np(x, s, s_next, cond[i:i + 1], a, float(SIGMAS[1]))
            sig2 = std ** 2 / (s_next - s) * -1.0  # sig_t^2
            dmean_dv = (1.0 + sig2 / (2 * s) * (1 - s)) * (s_next - s)
            dlogp_dv = dmean_dv * (x_next - mean) / std ** 2 / (L * C)
            expected = add(expected, dv_dparams(x, s, -adv[i] * dlogp_dv / (b * k)))
    _, metrics, grads = method_grad("grpo", cfg, rng, batch={"cond": cond})
    np.testing.assert_allclose(float(metrics["advantage_abs_mean"]), np.abs(adv).mean(),
                               rtol=1e-4)
    assert_grads(grads, expected, rtol=1e-3, atol=1e-6)


def test_grpo_bad_batch_and_missing_reference_raise():
    with pytest.raises(ValueError, match="group_size"):
        method_grad("grpo", grpo_config(group_size=3), jax.random.key(0))
    with pytest.raises(ValueError, match="reference"):
        method_grad("grpo", grpo_config(kl_coef=0.1), jax.random.key(0))


# ------------------------------------------------------------------------- smoke


class TinyVelocity(nn.Module):
    @nn.compact
    def __call__(self, x, sigma, cond):
        n = x.shape[1]
        h = jnp.concatenate([x, jnp.broadcast_to(sigma[:, None, None], (x.shape[0], n, 1)),
                             jnp.broadcast_to(cond[:, None], (x.shape[0], n, cond.shape[-1]))],
                            axis=-1)
        return nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(16)(h)))


@pytest.mark.parametrize("name,overrides", [
    ("refl", {}), ("draft", {"k": 2}), ("draft_lv", {}), ("drtune", {"t_min": 3}),
    ("alignprop", {"truncate": True}), ("grpo", {"group_size": 2, "kl_coef": 0.1}),
])
def test_methods_jit_and_grad_on_a_tiny_mlp(name, overrides):
    model = TinyVelocity()
    b = 4
    x = jnp.zeros((b, L, C))
    cond = jnp.asarray(_rs.standard_normal((b, C)), jnp.float32)
    params = model.init(jax.random.key(0), x, jnp.ones((b,)), cond)["params"]
    reference = jax.tree.map(lambda p: p + 0.05, params)
    pipe = Pipeline(lambda p, x, s, c: model.apply({"params": p}, x, s, c),
                    PIPE.decode, quadratic_reward, flow.flux_sigmas(5, shift=3.0), (L, C))
    cfg = config(name, **overrides)
    loss_fn = methods.get_loss(name)
    step = jax.jit(jax.value_and_grad(
        lambda p, rng: loss_fn(p, {"reference": reference}, {"cond": cond}, rng, pipe, cfg),
        has_aux=True))
    (value, metrics), grads = step(params, jax.random.key(1))
    assert np.isfinite(float(value))
    assert {"loss", "reward_mean", "reward_std"} <= set(metrics)
    assert all(np.isfinite(float(m)) and np.ndim(m) == 0 for m in metrics.values())
    norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
    assert np.isfinite(norm) and norm > 0.0
    if name == "grpo":
        assert float(metrics["kl"]) > 0.0
