"""Rectified flow: the sampling schedule, Flux latent packing and the Euler rollout.

Conventions (ALGORITHM.md): `x_t = (1 - t) x_clean + t noise`; a schedule decreases from
`sigma_0 = 1` (noise) to `sigma_T = 0` (clean); one Euler step is

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_theta(x_i, sigma_i),

and a *leap* is the same step between any two noise levels (`euler_step`); the leap to
`sigma = 0` is the one-step clean estimate (`clean_estimate`). `euler_rollout` runs the ODE
without gradient, `euler_chain` with it (optionally through its last steps only).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Params = Any  # a pytree of arrays
# (params, x (B, ...), sigma (B,)) -> velocity (B, ...)
StepVelocityFn = Callable[[Params, jax.Array, jax.Array], jax.Array]

sg = jax.lax.stop_gradient  # the one alias of stop_gradient; the methods import it from here


# --------------------------------------------------------------------------- schedules


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's resolution shift `mu`: linear in the image token count, 0.5 at 256, 1.15 at 4096."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(base_shift + m * (image_seq_len - base_seq_len))


def time_shift(mu: float, t: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """Flux time shift `e^mu / (e^mu + (1/t - 1))`, with `t = 0 -> 0`.

    Written as `e^mu t / (e^mu t + 1 - t)`, the same function without dividing by `t`, so
    `t = 0` needs no special case and the gradient is finite everywhere on [0, 1].
    """
    a = math.exp(mu)
    return a * t / (a * t + (1.0 - t))


def _constant_shift(s: float, t: np.ndarray) -> np.ndarray:
    """SD3's constant shift `s t / (1 + (s - 1) t)`."""
    return s * t / (1.0 + (s - 1.0) * t)


def flux_sigmas(num_steps: int, image_seq_len: int | None = None, *,
                shift: float | None = None) -> np.ndarray:
    """The sampling schedule `sigma_0 = 1 > sigma_1 > ... > sigma_T = 0`, float32 (T + 1,).

    With `image_seq_len`: FluxPipeline's schedule, `linspace(1, 1/T, T)` time-shifted with
    `mu = flux_mu(image_seq_len)`, then 0 appended. With `shift`: SD3's constant shift of
    `linspace(1, 0, T + 1)`. With neither: the plain `linspace(1, 0, T + 1)`.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1; "
                         "set the number of Euler steps to a positive integer")
    if image_seq_len is not None and shift is not None:
        raise ValueError("flux_sigmas got both image_seq_len and shift; pass only one "
                         "(image_seq_len for Flux's resolution shift, shift for a constant one)")
    num_steps = int(num_steps)
    # Flux starts from linspace(1, 1/T, T) and appends 0: the same grid as linspace(1, 0, T+1)
    # because every shift maps 0 to 0.
    t = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64)
    if image_seq_len is not None:
        if image_seq_len < 1:
            raise ValueError(f"image_seq_len={image_seq_len!r} must be >= 1; pass the number "
                             "of packed image tokens (latent H/2 * W/2 for Flux)")
        t = time_shift(flux_mu(image_seq_len), t)
    elif shift is not None:
        if not shift > 0:
            raise ValueError(f"shift={shift!r} must be > 0; SD3 uses 3.0, 1.0 means no shift")
        t = _constant_shift(float(shift), t)
    sigmas = t.astype(np.float32)
    if not np.all(np.diff(sigmas) < 0):
        raise ValueError(f"the {num_steps}-step schedule is not strictly decreasing in "
                         "float32; use fewer steps or a milder shift")
    return sigmas


# --------------------------------------------------------------------------- packing


def pack_latents(z: jax.Array, *, patch_size: int = 2) -> jax.Array:
    """(B, H, W, C) latent -> (B, H/p * W/p, p*p*C) tokens, Flux's patchification.

    Tokens run row-major over the patch grid; within a token the channel index is
    `c * p*p + dy * p + dx`, the order of diffusers' `FluxPipeline._pack_latents` on the
    same tensor in NCHW. `patch_size=1` just flattens the pixels into tokens.
    """
    b, h, w, c = z.shape
    p = patch_size
    if p < 1 or h % p or w % p:
        raise ValueError(f"latent of height {h} and width {w} cannot be cut into "
                         f"{p}x{p} patches; use a latent size divisible by patch_size={p}")
    z = z.reshape(b, h // p, p, w // p, p, c)
    z = z.transpose(0, 1, 3, 5, 2, 4)  # (B, H/p, W/p, C, dy, dx)
    return z.reshape(b, (h // p) * (w // p), c * p * p)


def unpack_latents(x: jax.Array, height: int, width: int, *, patch_size: int = 2) -> jax.Array:
    """(B, H/p * W/p, p*p*C) tokens -> (B, H, W, C) latent; the inverse of `pack_latents`.

    `height`, `width` are the latent's (not the image's) size.
    """
    b, n, d = x.shape
    p = patch_size
    if p < 1 or height % p or width % p or n != (height // p) * (width // p) or d % (p * p):
        raise ValueError(f"tokens of shape {tuple(x.shape)} do not form a {height}x{width} "
                         f"latent with {p}x{p} patches; pass the latent height/width and "
                         "the patch_size used to pack")
    c = d // (p * p)
    x = x.reshape(b, height // p, width // p, c, p, p)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # (B, H/p, dy, W/p, dx, C)
    return x.reshape(b, height, width, c)


def image_ids(height_tokens: int, width_tokens: int) -> np.ndarray:
    """Flux image token ids (H*W, 3) float32: `(0, row, col)`, row-major like the packing."""
    ids = np.zeros((height_tokens, width_tokens, 3), np.float32)
    ids[..., 1] = np.arange(height_tokens, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(width_tokens, dtype=np.float32)[None, :]
    return ids.reshape(height_tokens * width_tokens, 3)


def text_ids(seq_len: int) -> np.ndarray:
    """Flux text token ids (S, 3): all zeros, text carries no position in the RoPE."""
    return np.zeros((seq_len, 3), np.float32)


# --------------------------------------------------------------------------- Euler ODE


def per_sample(s: jax.Array | float, like: jax.Array) -> jax.Array:
    """Scalar or (B,) -> float32 (B, 1, ..., 1), broadcastable against the batch-first `like`.

    Noise levels stay float32 whatever `like`'s dtype: the difference of two nearby sigmas
    (an Euler step size) would lose most of its digits in bfloat16.
    """
    s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), like.shape[:1])
    return s.reshape(s.shape + (1,) * (like.ndim - 1))


def euler_step(velocity_fn: StepVelocityFn, params: Params, x: jax.Array,
               sigma: jax.Array | float, sigma_next: jax.Array | float) -> jax.Array:
    """One Euler step (or leap) `x + (sigma_next - sigma) v_theta(x, sigma)`.

    `sigma`, `sigma_next` are scalars or per-sample (B,); the velocity always sees sigma
    as (B,). Gradients flow through `params` and `x`; the rollout detaches them itself.
    """
    s = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    dt = per_sample(sigma_next, x) - per_sample(s, x)
    v = velocity_fn(params, x, s)
    return (x + dt * v).astype(x.dtype)


def clean_estimate(velocity_fn: StepVelocityFn, params: Params, x: jax.Array,
                   sigma: jax.Array | float) -> jax.Array:
    """One leap to the clean latent, `x - sigma v_theta(x, sigma)` (sigma scalar or (B,))."""
    return euler_step(velocity_fn, params, x, sigma, 0.0)


def euler_rollout(velocity_fn: StepVelocityFn, params: Params, x0: jax.Array,
                  sigmas: np.ndarray | jax.Array, keep: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array | None]:
    """The T-step Euler ODE from noise `x_0` to the clean latent `x_T`, without gradient.

    `keep` (B, K) int holds, per sample, step indices in [0, T]: index i keeps `x_i`, the
    latent *before* step i (`x_0` the noise, `x_T` the clean latent). Returns `(x_T, kept)`
    with `kept` (B, K, ...) or None. A `lax.scan` whose carry is `x` and the (B, K, ...)
    buffer only, so memory does not grow with T. Outputs carry no gradient.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    num_steps = sigmas.shape[0] - 1
    params, x0 = sg(params), sg(x0)

    def remember(kept, x, i):
        """Writes `x_i` into the slots whose index is i; per-sample indices differ."""
        if kept is None:
            return None
        mask = (keep == i).reshape(keep.shape + (1,) * (x.ndim - 1))
        return jnp.where(mask, x[:, None], kept)

    def body(carry, xs):
        x, kept = carry
        i, s, s_next = xs
        kept = remember(kept, x, i)
        return (euler_step(velocity_fn, params, x, s, s_next), kept), None

    kept0 = None
    if keep is not None:
        keep = jnp.asarray(keep, jnp.int32)
        kept0 = jnp.zeros(keep.shape + x0.shape[1:], x0.dtype)
    steps = (jnp.arange(num_steps, dtype=jnp.int32), sigmas[:-1], sigmas[1:])
    (x, kept), _ = jax.lax.scan(body, (x0, kept0), steps)
    kept = remember(kept, x, num_steps)  # index T is the clean latent
    return sg(x), (None if kept is None else sg(kept))


def sample(velocity_fn: StepVelocityFn, params: Params, x0: jax.Array,
           sigmas: np.ndarray | jax.Array) -> jax.Array:
    """The clean latent `x_T` of the Euler ODE from noise `x0` (jit it at the call site)."""
    return euler_rollout(velocity_fn, params, x0, sigmas)[0]


def euler_chain(velocity_fn: StepVelocityFn, params: Params, x: jax.Array,
                sigmas: np.ndarray | jax.Array, *, remat: bool = True,
                grad_from: jax.Array | int | None = None) -> jax.Array:
    """Euler steps from `x` through the schedule `sigmas` (n + 1,), gradient on.

    Without `grad_from` the gradient is the chain rule through all n steps; `remat`
    recomputes each step's activations in the backward pass, so memory holds n latents
    instead of n steps' activations. With `grad_from` (a static or traced step index in
    [0, n]) only steps `grad_from .. n-1` carry gradient (AlignProp's truncation): the
    backward pass recomputes and differentiates those steps alone, so the detached ones
    cost no backward work (`_truncated_chain`). Gradient reaches `x` only if `grad_from`
    is 0. The truncated chain always recomputes its steps (`remat=False` is refused there).
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def step(p, x, s, s_next):
        return euler_step(velocity_fn, p, x, s, s_next)

    if grad_from is not None:
        if not remat:
            raise ValueError("euler_chain with grad_from recomputes every differentiated step "
                             "in the backward pass; pass remat=True (or no grad_from)")
        return _truncated_chain(step, params, x, sigmas, grad_from)
    if remat:
        step = jax.checkpoint(step, prevent_cse=False)  # inside scan CSE is no concern

    def body(x, xs):
        s, s_next = xs
        return step(params, x, s, s_next), None

    x, _ = jax.lax.scan(body, x, (sigmas[:-1], sigmas[1:]))
    return x


def _truncated_chain(step: Callable[..., jax.Array], params: Params, x: jax.Array,
                     sigmas: jax.Array, grad_from: jax.Array | int) -> jax.Array:
    """`euler_chain` whose gradient runs through steps `grad_from .. n-1` only.

    A custom VJP: the forward pass is the plain scan and keeps each step's input latent
    (n latents, as a rematerialised chain does); the backward pass is a while loop from step
    n - 1 down to `grad_from` that recomputes one step and applies its VJP. Steps before
    `grad_from` are never visited, where masking their outputs with stop_gradient inside a
    scan would still run (and rematerialise) every step's backward with zero cotangents.
    """
    num_steps = sigmas.shape[0] - 1
    first = jnp.clip(jnp.asarray(grad_from, jnp.int32), 0, num_steps)

    def forward(p, x0):
        def body(x, xs):
            s, s_next = xs
            return step(p, x, s, s_next), x
        return jax.lax.scan(body, x0, (sigmas[:-1], sigmas[1:]))

    @jax.custom_vjp
    def chain(p, x0):
        return forward(p, x0)[0]

    def chain_fwd(p, x0):
        x_last, inputs = forward(p, x0)  # inputs[i] = x_i, the latent before step i
        return x_last, (p, inputs)

    def chain_bwd(res, g):
        p, inputs = res

        def body(carry):
            i, gp, gx = carry
            _, vjp = jax.vjp(lambda p_, x_: step(p_, x_, sigmas[i], sigmas[i + 1]),
                             p, inputs[i])
            dp, gx = vjp(gx)
            return i - 1, jax.tree.map(jnp.add, gp, dp), gx

        zeros = jax.tree.map(jnp.zeros_like, p)
        _, gp, gx = jax.lax.while_loop(lambda c: c[0] >= first, body,
                                       (jnp.int32(num_steps - 1), zeros, g))
        # gx is now the cotangent of x_first: it reaches the input only if no step is detached.
        return gp, jnp.where(first == 0, gx, jnp.zeros_like(gx))

    chain.defvjp(chain_fwd, chain_bwd)
    return chain(params, x)
