"""LeapAlign core: the two-leap gradient against its closed form, weights, pairs, loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leapalign_jax import methods
from leapalign_jax.methods import leapalign
from leapalign_jax.pipeline import Pipeline

B, LATENT, P = 4, (3, 2), 5  # batch, per-sample latent shape, number of params
D = int(np.prod(LATENT))


class Linear:
    """v(theta, x, s) = x A + s (theta C) + theta E (+ cond), on flattened latents.

    dv/dx is A (acting on the right), dv/dtheta at noise level s is (s C + E) (P, D).
    """

    def __init__(self, seed: int):
        r = np.random.default_rng(seed)
        self.a = r.normal(size=(D, D)) / np.sqrt(D)
        self.c = r.normal(size=(P, D))
        self.e = r.normal(size=(P, D))
        self.theta = r.normal(size=(P,))

    def params(self):
        return {"theta": jnp.asarray(self.theta, jnp.float32)}

    def velocity(self, params, x, s, cond=None):
        a, c, e = (jnp.asarray(m, jnp.float32) for m in (self.a, self.c, self.e))
        th = params["theta"]
        v = x.reshape(x.shape[0], -1) @ a + s[:, None] * (th @ c)[None] + (th @ e)[None]
        if cond is not None:
            v = v + cond
        return v.reshape(x.shape)

    def velocity_np(self, x, s, cond=None):
        """The same map in float64 numpy (x: (B, D) flattened)."""
        v = x @ self.a + s[:, None] * (self.theta @ self.c)[None] + (self.theta @ self.e)[None]
        return v if cond is None else v + cond

    def grad_closed_form(self, g, s_k, s_j, alpha):
        """d(sum g * x_clean)/dtheta from ALGORITHM.md's formula; g: (B, D) float64."""
        total = np.zeros(P)
        for b in range(g.shape[0]):
            jac_k = s_k[b] * self.c + self.e  # dv_k/dtheta, (P, D)
            jac_j = s_j[b] * self.c + self.e  # dv_j/dtheta
            total += ((s_j[b] - s_k[b]) * jac_k @ g[b] - s_j[b] * jac_j @ g[b]
                      - alpha * s_j[b] * (s_j[b] - s_k[b]) * jac_k @ (self.a @ g[b]))
        return total


def _latents(seed: int):
    r = np.random.default_rng(seed)
    x_k, x_j, x_clean = (r.normal(size=(B,) + LATENT).astype(np.float32) for _ in range(3))
    s_k = r.uniform(0.5, 1.0, size=B).astype(np.float32)
    s_j = (s_k * r.uniform(0.1, 0.9, size=B)).astype(np.float32)
    return x_k, x_j, x_clean, s_k, s_j


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_gradient_equals_closed_form(alpha):
    model = Linear(0)
    x_k, x_j, x_clean, s_k, s_j = _latents(1)
    g = np.random.default_rng(2).normal(size=(B,) + LATENT).astype(np.float32)

    def objective(params):
        out = leapalign.leap_to_clean(model.velocity, params, x_k, x_j, x_clean, s_k, s_j,
                                      alpha=alpha, tau=0.1)
        return jnp.sum(g * out.x_clean)

    got = jax.grad(objective)(model.params())["theta"]
    want = model.grad_closed_form(g.reshape(B, D).astype(np.float64),
                                  s_k.astype(np.float64), s_j.astype(np.float64), alpha)
    assert _rel_err(got, want) < 1e-5
    if alpha > 0:  # the nested term is present and not negligible in this setup
        no_nested = model.grad_closed_form(g.reshape(B, D).astype(np.float64),
                                           s_k.astype(np.float64), s_j.astype(np.float64), 0.0)
        assert _rel_err(got, no_nested) > 1e-2


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_forward_value_is_the_rollout_latent(alpha):
    model = Linear(0)
    x_k, x_j, x_clean, s_k, s_j = _latents(3)
    fn = jax.jit(lambda p: leapalign.leap_to_clean(model.velocity, p, x_k, x_j, x_clean,
                                                   s_k, s_j, alpha=alpha, tau=0.1))
    for out in (fn(model.params()),
                leapalign.leap_to_clean(model.velocity, model.params(), x_k, x_j, x_clean,
                                        s_k, s_j, alpha=alpha, tau=0.1)):
        np.testing.assert_array_equal(np.asarray(out.x_clean), x_clean)  # bitwise, 0 ulp


def test_weight_and_distances_match_numpy():
    model = Linear(4)
    tau = 0.1
    r = np.random.default_rng(5)
    x_k, _, _, s_k, s_j = _latents(6)
    flat = lambda x: x.reshape(B, D).astype(np.float64)  # noqa: E731
    # Place x_j and x_clean at chosen distances from the leaps' ends so each sample hits a
    # different side of the tau floor: (d_j, d_clean) ~ (small, small), (small, big), ...
    eps_j = np.array([0.01, 0.02, 0.5, 0.8])
    eps_c = np.array([0.03, 0.6, 0.04, 1.0])
    xhat_j = flat(x_k) + (s_j - s_k)[:, None] * model.velocity_np(flat(x_k), s_k)
    x_j = xhat_j + eps_j[:, None] * r.choice([-1.0, 1.0], size=(B, D))
    xhat_clean = x_j - s_j[:, None] * model.velocity_np(x_j, s_j)
    x_clean = xhat_clean + eps_c[:, None] * r.choice([-1.0, 1.0], size=(B, D))
    x_j, x_clean = (x.reshape((B,) + LATENT).astype(np.float32) for x in (x_j, x_clean))

    out = leapalign.leap_to_clean(model.velocity, model.params(), x_k, x_j, x_clean, s_k,
                                  s_j, alpha=0.3, tau=tau)
    np.testing.assert_allclose(out.d_j, eps_j, rtol=0, atol=2e-6)
    np.testing.assert_allclose(out.d_clean, eps_c, rtol=0, atol=2e-6)
    want_w = 1.0 / (np.maximum(eps_j, tau) + np.maximum(eps_c, tau))
    np.testing.assert_allclose(out.weight, want_w, rtol=1e-5)
    assert float(out.weight[0]) == pytest.approx(1.0 / (2 * tau), rel=1e-6)  # both floored

    def summed(params):
        o = leapalign.leap_to_clean(model.velocity, params, x_k, x_j, x_clean, s_k, s_j,
                                    alpha=0.3, tau=tau)
        return jnp.sum(o.weight) + jnp.sum(o.d_j) + jnp.sum(o.d_clean)

    grad = jax.grad(summed)(model.params())["theta"]
    np.testing.assert_array_equal(np.asarray(grad), np.zeros(P, np.float32))


def _mlp():
    """A small nonlinear velocity, so dv/dx depends on where it is evaluated."""
    r = np.random.default_rng(7)
    params = {"w1": jnp.asarray(r.normal(size=(D + 1, 16)) / 2, jnp.float32),
              "w2": jnp.asarray(r.normal(size=(16, D)) / 4, jnp.float32)}

    def velocity(p, x, s):
        h = jnp.concatenate([x.reshape(x.shape[0], -1), s[:, None]], axis=1)
        return (jnp.tanh(h @ p["w1"]) @ p["w2"]).reshape(x.shape)

    return velocity, params


def _reference_grad(velocity, params, lat, g, detach_input: bool):
    """Two leaps written out directly; leap 2's input is sg(xtil_j) (DRTune) or xtil_j."""
    x_k, x_j, x_clean, s_k, s_j = lat
    sg = jax.lax.stop_gradient
    col = lambda s: s[:, None, None]  # noqa: E731

    def objective(p):
        xhat_j = x_k + (col(s_j) - col(s_k)) * velocity(p, x_k, s_k)
        xtil_j = xhat_j + sg(x_j - xhat_j)
        u = sg(xtil_j) if detach_input else xtil_j
        xhat_clean = xtil_j - col(s_j) * velocity(p, u, s_j)
        return jnp.sum(g * (xhat_clean + sg(x_clean - xhat_clean)))

    return jax.grad(objective)(params)


def test_alpha_zero_is_detached_input_and_alpha_one_the_full_graph():
    velocity, params = _mlp()
    lat = _latents(8)
    g = np.random.default_rng(9).normal(size=(B,) + LATENT).astype(np.float32)

    def grad_at(alpha):
        def objective(p):
            out = leapalign.leap_to_clean(velocity, p, *lat, alpha=alpha, tau=0.1)
            return jnp.sum(g * out.x_clean)
        return jax.grad(objective)(params)

    g0, g1, g03 = grad_at(0.0), grad_at(1.0), grad_at(0.3)
    ref0 = _reference_grad(velocity, params, lat, g, detach_input=True)
    ref1 = _reference_grad(velocity, params, lat, g, detach_input=False)
    for name in params:
        assert _rel_err(g0[name], ref0[name]) < 1e-5
        assert _rel_err(g1[name], ref1[name]) < 1e-5
        assert _rel_err(g0[name], g1[name]) > 1e-3  # the nested term matters here
        # The nested term is scaled by alpha, not removed: the gradient is affine in alpha.
        assert _rel_err(g03[name], 0.7 * g0[name] + 0.3 * g1[name]) < 1e-5


def test_sample_step_pairs_uniform_over_distinct_pairs():
    lo, hi, n = 3, 8, 20000
    k, j = leapalign.sample_step_pairs(jax.random.key(0), n, lo, hi)
    assert k.dtype == jnp.int32 and j.dtype == jnp.int32 and k.shape == j.shape == (n,)
    k, j = np.asarray(k), np.asarray(j)
    assert np.all(k < j) and k.min() >= lo and j.max() < hi
    pairs = [(a, b) for a in range(lo, hi) for b in range(a + 1, hi)]
    counts = np.array([np.sum((k == a) & (j == b)) for a, b in pairs])
    assert counts.sum() == n  # every draw is one of the 10 pairs
    expected = n / len(pairs)
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 40.0, (chi2, counts)  # 9 dof: P(chi2 > 40) ~ 1e-5

    k2, j2 = leapalign.sample_step_pairs(jax.random.key(1), 64, 5, 7)
    assert np.all(np.asarray(k2) == 5) and np.all(np.asarray(j2) == 6)


@pytest.mark.parametrize("lo,hi", [(3, 4), (3, 3), (5, 2)])
def test_sample_step_pairs_rejects_empty_range(lo, hi):
    with pytest.raises(ValueError, match="two distinct steps"):
        leapalign.sample_step_pairs(jax.random.key(0), 4, lo, hi)


def _toy_pipeline(model: Linear, num_steps: int = 6):
    sigmas = np.linspace(1.0, 0.0, num_steps + 1).astype(np.float32)

    def velocity(params, x, s, cond):
        return model.velocity(params, x, s, cond["vec"])

    def reward(frozen, images, batch):  # quadratic: 1 - mean (img - target)^2
        return 1.0 - jnp.mean((images - frozen["target"]) ** 2, axis=(1, 2))

    pipe = Pipeline(velocity=velocity, decode=lambda frozen, x: x, reward=reward,
                    sigmas=sigmas, latent_shape=LATENT)
    return pipe, sigmas


def _hand_loss(model, sigmas, x0, cond, k, j, target, cfg):
    """LeapAlign loss, rollout and leaps in float64 numpy; also the closed-form gradient."""
    xs = [x0.reshape(B, D).astype(np.float64)]
    for i in range(len(sigmas) - 1):
        s = np.full(B, sigmas[i], np.float64)
        xs.append(xs[-1] + (sigmas[i + 1] - sigmas[i]) * model.velocity_np(xs[-1], s, cond))
    rows = np.arange(B)
    x_t = xs[-1]
    x_k, x_j = np.stack(xs)[k, rows], np.stack(xs)[j, rows]
    s_k, s_j = sigmas[k].astype(np.float64), sigmas[j].astype(np.float64)
    xhat_j = x_k + (s_j - s_k)[:, None] * model.velocity_np(x_k, s_k, cond)
    xhat_clean = x_j - s_j[:, None] * model.velocity_np(x_j, s_j, cond)
    d_j = np.mean(np.abs(x_j - xhat_j), axis=1)
    d_clean = np.mean(np.abs(x_t - xhat_clean), axis=1)
    w = 1.0 / (np.maximum(d_j, cfg.tau) + np.maximum(d_clean, cfg.tau))
    if not cfg.use_weight:
        w = np.ones(B)
    r = 1.0 - np.mean((x_t - target.reshape(1, D)) ** 2, axis=1)
    active = (cfg.hinge_lambda - r > 0).astype(np.float64)
    value = np.mean(w * active * (cfg.hinge_lambda - r))
    # dL/dx_clean = w_b * active_b * (-dr/dx) / B, with dr/dx = -2 (x - target) / D.
    g = (w * active)[:, None] * 2.0 * (x_t - target.reshape(1, D)) / (D * B)
    grad = model.grad_closed_form(g, s_k, s_j, cfg.alpha)
    return value, grad, r, d_j, d_clean, w


@pytest.mark.parametrize("use_weight", [True, False])
def test_loss_matches_hand_computation(use_weight):
    model = Linear(10)
    pipe, sigmas = _toy_pipeline(model)
    r = np.random.default_rng(11)
    cond = r.normal(size=(B, D)).astype(np.float32) * 0.3
    target = r.normal(size=LATENT).astype(np.float32) * 0.5
    batch, frozen = {"cond": {"vec": jnp.asarray(cond)}}, {"target": jnp.asarray(target)}
    rng = jax.random.key(12)
    cfg = leapalign.default_config()
    cfg.use_weight = use_weight

    # The contract of loss(): rng splits into (noise, pairs).
    rng_noise, rng_pairs = jax.random.split(rng)
    x0 = np.asarray(jax.random.normal(rng_noise, (B,) + LATENT, jnp.float32))
    k, j = (np.asarray(a) for a in leapalign.sample_step_pairs(rng_pairs, B, 0, 6))
    # Put lambda between the middle rewards, so the hinge is on for half the batch.
    _, _, rewards, *_ = _hand_loss(model, sigmas, x0, cond, k, j, target, cfg)
    cfg.hinge_lambda = float(np.mean(np.sort(rewards)[1:3]))
    want, want_grad, rewards, d_j, d_clean, w = _hand_loss(model, sigmas, x0, cond, k, j,
                                                           target, cfg)

    loss_fn = jax.jit(lambda p: leapalign.loss(p, frozen, batch, rng, pipe, cfg))
    (value, metrics), grad = jax.jit(jax.value_and_grad(
        lambda p: leapalign.loss(p, frozen, batch, rng, pipe, cfg), has_aux=True))(
            model.params())
    assert float(loss_fn(model.params())[0]) == pytest.approx(float(value), rel=1e-6)
    assert float(value) == pytest.approx(want, rel=1e-5)
    assert want > 0
    assert np.all(np.isfinite(np.asarray(grad["theta"])))
    assert _rel_err(grad["theta"], want_grad) < 1e-5

    assert set(metrics) == {"loss", "reward_mean", "reward_std", "weight_mean", "d_j",
                            "d_clean", "k_mean", "j_mean"}
    assert all(np.shape(v) == () for v in metrics.values())
    assert float(metrics["reward_mean"]) == pytest.approx(rewards.mean(), rel=1e-5)
    assert float(metrics["reward_std"]) == pytest.approx(rewards.std(), rel=1e-4)
    assert float(metrics["weight_mean"]) == pytest.approx(w.mean(), rel=1e-5)
    assert float(metrics["d_j"]) == pytest.approx(d_j.mean(), rel=1e-4)
    assert float(metrics["d_clean"]) == pytest.approx(d_clean.mean(), rel=1e-4)
    assert float(metrics["k_mean"]) == pytest.approx(k.mean())
    assert float(metrics["j_mean"]) == pytest.approx(j.mean())


def test_config_defaults_and_registry():
    cfg = methods.default_config("leapalign")
    assert (cfg.alpha, cfg.tau, cfg.hinge_lambda) == (0.3, 0.1, 0.55)
    assert (cfg.min_idx, cfg.max_idx, cfg.use_weight) == (0, None, True)
    assert methods.get_loss("leapalign") is leapalign.loss
    cfg.max_idx = 4  # the placeholder takes an int override
    assert cfg.max_idx == 4


def test_loss_rejects_step_range_outside_trajectory():
    model = Linear(0)
    pipe, _ = _toy_pipeline(model)
    batch = {"cond": {"vec": jnp.zeros((B, D))}}
    frozen = {"target": jnp.zeros(LATENT)}
    cfg = leapalign.default_config()
    cfg.max_idx = 7  # T = 6
    with pytest.raises(ValueError, match="min_idx / max_idx"):
        leapalign.loss(model.params(), frozen, batch, jax.random.key(0), pipe, cfg)
    cfg.max_idx, cfg.min_idx = None, 5
    with pytest.raises(ValueError, match="two distinct steps"):
        leapalign.loss(model.params(), frozen, batch, jax.random.key(0), pipe, cfg)
