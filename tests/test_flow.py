"""Schedule, packing and Euler rollout: parity with diffusers and closed-form ODE checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from leapalign_jax import flow

# FLUX.1-dev's scheduler/scheduler_config.json.
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                          base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                          max_image_seq_len=4096)


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("steps,seq_len", [(4, 256), (25, 2025), (28, 4096), (50, 1024),
                                           (1, 16)])
def test_flux_sigmas_equal_diffusers(steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    mu = calculate_shift(seq_len, sched.config.base_image_seq_len,
                         sched.config.max_image_seq_len, sched.config.base_shift,
                         sched.config.max_shift)
    assert flow.flux_mu(seq_len) == pytest.approx(mu, abs=1e-12)
    # What FluxPipeline.__call__ passes to retrieve_timesteps.
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ref = sched.sigmas.numpy()

    ours = flow.flux_sigmas(steps, seq_len)
    assert ours.dtype == np.float32 and ours.shape == (steps + 1,)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    assert ours[0] == 1.0 and ours[-1] == 0.0 and np.all(np.diff(ours) < 0)


def test_constant_shift_equals_diffusers_static_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28))
    np.testing.assert_allclose(flow.flux_sigmas(28, shift=3.0), sched.sigmas.numpy(),
                               rtol=0, atol=1e-6)


def test_plain_schedule_and_time_shift_edges():
    np.testing.assert_allclose(flow.flux_sigmas(4), [1.0, 0.75, 0.5, 0.25, 0.0], atol=0)
    t = np.array([0.0, 0.3, 1.0])
    mu = 0.8
    out = flow.time_shift(mu, t)
    assert out[0] == 0.0 and out[2] == 1.0
    assert out[1] == pytest.approx(np.exp(mu) / (np.exp(mu) + (1 / 0.3 - 1)), rel=1e-12)
    # jax input: same values, finite gradient at t = 0.
    np.testing.assert_allclose(flow.time_shift(mu, jnp.asarray(t, jnp.float32)), out, atol=1e-6)
    assert float(jax.grad(lambda s: flow.time_shift(mu, s))(0.0)) == pytest.approx(np.exp(mu))


@pytest.mark.parametrize("kwargs", [dict(num_steps=0), dict(num_steps=-3),
                                    dict(num_steps=4, image_seq_len=256, shift=3.0),
                                    dict(num_steps=4, shift=0.0),
                                    dict(num_steps=4, image_seq_len=0)])
def test_flux_sigmas_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        flow.flux_sigmas(**kwargs)


# --------------------------------------------------------------------------- packing


def test_pack_unpack_match_diffusers():
    import torch
    from diffusers import FluxPipeline

    b, c, h, w = 2, 16, 6, 10
    nchw = np.random.default_rng(0).standard_normal((b, c, h, w)).astype(np.float32)
    nhwc = jnp.asarray(nchw.transpose(0, 2, 3, 1))

    ref = FluxPipeline._pack_latents(torch.from_numpy(nchw), b, c, h, w).numpy()
    packed = flow.pack_latents(nhwc)
    assert packed.shape == (b, (h // 2) * (w // 2), 4 * c)
    np.testing.assert_array_equal(np.asarray(packed), ref)

    # diffusers' unpack takes the *image* size and its VAE factor (8).
    ref_un = FluxPipeline._unpack_latents(torch.from_numpy(ref), h * 8, w * 8, 8).numpy()
    unpacked = flow.unpack_latents(packed, h, w)
    np.testing.assert_array_equal(np.asarray(unpacked), ref_un.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(unpacked), np.asarray(nhwc))


def test_patch_one_is_plain_reshape_and_round_trips():
    z = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8, 8, 4)), jnp.float32)
    x = flow.pack_latents(z, patch_size=1)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(z).reshape(3, 64, 4))
    np.testing.assert_array_equal(np.asarray(flow.unpack_latents(x, 8, 8, patch_size=1)),
                                  np.asarray(z))
    x2 = flow.pack_latents(z, patch_size=2)
    np.testing.assert_array_equal(np.asarray(flow.unpack_latents(x2, 8, 8)), np.asarray(z))


def test_packing_rejects_bad_shapes():
    with pytest.raises(ValueError):
        flow.pack_latents(jnp.zeros((1, 5, 4, 2)))
    with pytest.raises(ValueError):
        flow.unpack_latents(jnp.zeros((1, 6, 8)), 4, 4)


def test_ids_layout_matches_diffusers_and_packing():
    import torch
    from diffusers import FluxPipeline

    ids = flow.image_ids(3, 5)
    ref = FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32).numpy()
    assert ids.shape == (15, 3) and ids.dtype == np.float32
    np.testing.assert_array_equal(ids, ref)
    # token n of the packing is the patch at (row, col) = divmod(n, W/2).
    z = jnp.arange(6 * 10, dtype=jnp.float32).reshape(1, 6, 10, 1)
    tokens = np.asarray(flow.pack_latents(z))[0]
    rows, cols = flow.image_ids(3, 5)[:, 1].astype(int), flow.image_ids(3, 5)[:, 2].astype(int)
    np.testing.assert_array_equal(tokens[:, 0], np.asarray(z)[0, 2 * rows, 2 * cols, 0])
    np.testing.assert_array_equal(flow.text_ids(7), np.zeros((7, 3), np.float32))


# --------------------------------------------------------------------------- rollout


def _python_rollout(velocity_fn, params, x0, sigmas):
    xs = [x0]
    for i in range(len(sigmas) - 1):
        xs.append(flow.euler_step(velocity_fn, params, xs[-1], sigmas[i], sigmas[i + 1]))
    return jnp.stack(xs, axis=1)  # (B, T + 1, ...)


def test_straight_flow_is_exact():
    """v = noise - x_clean is constant along the straight path, so Euler lands on x_clean."""
    rng = np.random.default_rng(2)
    noise = jnp.asarray(rng.standard_normal((3, 16, 4)), jnp.float32)
    clean = jnp.asarray(rng.standard_normal((3, 16, 4)), jnp.float32)
    velocity = lambda p, x, s: p["noise"] - p["clean"]  # noqa: E731
    sigmas = flow.flux_sigmas(25, 1024)
    x_t, _ = jax.jit(flow.euler_rollout, static_argnums=0)(
        velocity, {"noise": noise, "clean": clean}, noise, sigmas)
    np.testing.assert_allclose(np.asarray(x_t), np.asarray(clean), rtol=0, atol=1e-5)
    # Every kept latent sits on the line x_i = (1 - sigma_i) clean + sigma_i noise.
    keep = jnp.array([[0, 7, 25], [3, 12, 24], [25, 1, 1]])
    _, kept = flow.euler_rollout(velocity, {"noise": noise, "clean": clean}, noise, sigmas, keep)
    s = sigmas[np.asarray(keep)][..., None, None]
    expect = (1 - s) * np.asarray(clean)[:, None] + s * np.asarray(noise)[:, None]
    np.testing.assert_allclose(np.asarray(kept), expect, rtol=0, atol=1e-5)


def test_linear_velocity_matches_euler_product():
    """v = A x: x_T = prod_i (I + (sigma_{i+1} - sigma_i) A) x_0, in float64 numpy."""
    rng = np.random.default_rng(3)
    d = 6
    a = rng.standard_normal((d, d)) * 0.5
    x0 = rng.standard_normal((2, d))
    sigmas = flow.flux_sigmas(10, 256)
    velocity = lambda p, x, s: x @ p.T  # noqa: E731
    x_t, _ = flow.euler_rollout(velocity, jnp.asarray(a, jnp.float32),
                                jnp.asarray(x0, jnp.float32), sigmas)
    m = np.eye(d)
    for i in range(10):
        m = (np.eye(d) + (float(sigmas[i + 1]) - float(sigmas[i])) * a) @ m
    np.testing.assert_allclose(np.asarray(x_t), x0 @ m.T, rtol=1e-5, atol=1e-5)


def test_sigma_reaches_velocity_per_sample():
    """The velocity sees sigma as (B,) equal to sigma_i at step i: v = sigma gives sum dt sigma."""
    sigmas = flow.flux_sigmas(5)
    velocity = lambda p, x, s: jnp.broadcast_to(s[:, None], x.shape)  # noqa: E731
    x_t, _ = flow.euler_rollout(velocity, {}, jnp.zeros((3, 2)), sigmas)
    expect = float(np.sum(np.diff(sigmas.astype(np.float64)) * sigmas[:-1]))
    np.testing.assert_allclose(np.asarray(x_t), np.full((3, 2), expect), atol=1e-6)
    # euler_step with per-sample (B,) sigmas: a different leap for each sample.
    s, s_next = jnp.array([1.0, 0.5, 0.8]), jnp.array([0.2, 0.0, 0.8])
    out = flow.euler_step(velocity, {}, jnp.ones((3, 2)), s, s_next)
    np.testing.assert_allclose(np.asarray(out[:, 0]), 1 + (s_next - s) * s, atol=1e-7)


def _tanh_velocity(p, x, s):
    return jnp.tanh(x @ p["w"]) * (1.0 + s[:, None, None]) + p["b"]


def _tanh_params(d=4):
    rng = np.random.default_rng(4)
    return {"w": jnp.asarray(rng.standard_normal((d, d)) * 0.7, jnp.float32),
            "b": jnp.asarray(rng.standard_normal((d,)) * 0.1, jnp.float32)}


def test_kept_latents_equal_python_loop_at_per_sample_indices():
    params = _tanh_params()
    x0 = jax.random.normal(jax.random.key(0), (4, 5, 4))
    sigmas = flow.flux_sigmas(8, 64)
    keep = jnp.array([[0, 3], [2, 8], [8, 0], [5, 5]])
    x_t, kept = jax.jit(flow.euler_rollout, static_argnums=0)(
        _tanh_velocity, params, x0, sigmas, keep)
    traj = _python_rollout(_tanh_velocity, params, x0, sigmas)
    assert kept.shape == (4, 2, 5, 4)
    expect = jnp.take_along_axis(traj, keep[:, :, None, None], axis=1)
    np.testing.assert_allclose(np.asarray(kept), np.asarray(expect), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(x_t), np.asarray(traj[:, -1]), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(flow.sample(_tanh_velocity, params, x0, sigmas)),
                                  np.asarray(x_t))


def test_rollout_carries_no_gradient():
    params = _tanh_params()
    x0 = jax.random.normal(jax.random.key(1), (2, 3, 4))
    sigmas = flow.flux_sigmas(4)

    def f(p, x):
        x_t, kept = flow.euler_rollout(_tanh_velocity, p, x, sigmas, jnp.array([[1], [2]]))
        return jnp.sum(x_t ** 2) + jnp.sum(kept ** 2)

    gp, gx = jax.grad(f, argnums=(0, 1))(params, x0)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(gp))
    assert float(jnp.max(jnp.abs(gx))) == 0.0
    # while a single Euler step does carry one (the leaps need it).
    g_step = jax.grad(lambda p: jnp.sum(flow.euler_step(_tanh_velocity, p, x0, 1.0, 0.5)))(params)
    assert float(jnp.max(jnp.abs(g_step["w"]))) > 0.0


@pytest.mark.parametrize("with_keep", [False, True])
def test_scan_carry_does_not_grow_with_steps(with_keep):
    """One scan of T iterations whose carry (and outputs) have the same size for every T."""
    params = _tanh_params()
    x0 = jnp.zeros((2, 16, 4))
    keep = jnp.array([[0, 1], [2, 3]]) if with_keep else None
    sizes = {}
    for steps in (3, 30, 300):
        jaxpr = jax.make_jaxpr(lambda p, x: flow.euler_rollout(
            _tanh_velocity, p, x, flow.flux_sigmas(steps), keep))(params, x0).jaxpr
        scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        assert len(scans) == 1
        eqn = scans[0]
        assert eqn.params["length"] == steps
        n_carry = eqn.params["num_carry"]
        # No stacked per-step outputs: everything the scan returns is carry.
        assert len(eqn.outvars) == n_carry
        sizes[steps] = sum(int(np.prod(v.aval.shape)) for v in eqn.outvars)
    assert len(set(sizes.values())) == 1
    expect = 2 * 16 * 4 * (3 if with_keep else 1)  # x, plus the (B, K=2, ...) buffer
    assert sizes[3] == expect


@pytest.mark.parametrize("remat", [True, False])
def test_chain_gradient_is_the_chain_rule_through_every_step(remat):
    params = _tanh_params()
    x0 = jax.random.normal(jax.random.key(2), (2, 3, 4))
    sigmas = flow.flux_sigmas(5, 64)
    g = jax.random.normal(jax.random.key(3), x0.shape)

    def unrolled(p, x):  # plain Python loop, differentiated by JAX as is
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = flow.euler_step(_tanh_velocity, p, x, s, s_next)
        return jnp.sum(g * x)

    got = jax.grad(lambda p, x: jnp.sum(g * flow.euler_chain(
        _tanh_velocity, p, x, sigmas, remat=remat)), argnums=(0, 1))(params, x0)
    want = jax.grad(unrolled, argnums=(0, 1))(params, x0)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_truncated_chain_is_a_detached_rollout_then_a_gradient_chain():
    """grad_from = m (traced): value of the full chain, gradient of the last n - m steps."""
    params = _tanh_params()
    x0 = jax.random.normal(jax.random.key(4), (2, 3, 4))
    n = 5
    sigmas = flow.flux_sigmas(n, 64)
    g = jax.random.normal(jax.random.key(5), x0.shape)

    def truncated(p, x, m):
        return jnp.sum(g * flow.euler_chain(_tanh_velocity, p, x, sigmas, grad_from=m))

    value_and_grad = jax.jit(jax.value_and_grad(truncated, argnums=(0, 1)))
    full = float(jnp.sum(g * flow.sample(_tanh_velocity, params, x0, sigmas)))
    for m in range(n + 1):
        def two_part(p, x):  # the DRaFT construction with a static split at m
            x_m, _ = flow.euler_rollout(_tanh_velocity, p, x, sigmas[:m + 1])
            if m == 0:
                x_m = x  # no detached step: the gradient reaches the input
            return jnp.sum(g * flow.euler_chain(_tanh_velocity, p, x_m, sigmas[m:]))

        value, got = value_and_grad(params, x0, m)
        want = jax.grad(two_part, argnums=(0, 1))(params, x0)
        assert float(value) == pytest.approx(full, rel=1e-5)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        if m == n:  # nothing differentiated
            assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(got))
    with pytest.raises(ValueError, match="remat"):
        flow.euler_chain(_tanh_velocity, params, x0, sigmas, remat=False, grad_from=1)


def test_clean_estimate_and_per_sample():
    params = _tanh_params()
    x = jax.random.normal(jax.random.key(6), (3, 2, 4))
    sigma = jnp.array([1.0, 0.5, 0.1])
    want = x - sigma[:, None, None] * _tanh_velocity(params, x, sigma)
    np.testing.assert_allclose(np.asarray(flow.clean_estimate(_tanh_velocity, params, x, sigma)),
                               np.asarray(want), rtol=1e-6, atol=1e-6)
    s = flow.per_sample(sigma, x.astype(jnp.bfloat16))
    assert s.shape == (3, 1, 1) and s.dtype == jnp.float32  # sigmas stay float32
    assert flow.per_sample(0.5, x).shape == (3, 1, 1)
