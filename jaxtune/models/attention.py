"""Memory-efficient ("flash") attention in plain JAX, for every backend.

``jax.nn.dot_product_attention``'s XLA path keeps the full [B, N, T, S] float32
probabilities (and the mask broadcast over heads) alive for the backward pass: with
scanned layers that is one such stack per layer, written, zero-initialised and read
again every step (a quarter of a bench-tiny CPU step), and at 8B x 2048 tokens it is
1 GiB per layer on an accelerator. Here the forward pass keeps only the output and the
per-row log-sum-exp; the backward pass recomputes the probabilities from them. With
``chunk`` < S the keys are visited in blocks with an online softmax (Rabe & Staats
2021; Dao 2022), so no [.., T, S] tensor larger than [.., T, chunk] ever exists.

Grouped-query attention is native (no repeated K/V); the boolean mask is the usual
[B, 1, T, S] one (causal, padding, packed segments, sliding windows), so every model
can use it unchanged. Fully masked query rows give zeros, with zero gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    chunk: int | None = None,
) -> jax.Array:
    """Attention without a stored [B, N, T, S] probability tensor.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H], N a multiple of K (grouped queries).
      mask: bool [B, 1, T, S]; True where query t may attend to key s.
      scale: multiplier of q·k.
      softcap: Gemma 2 style ``tanh`` capping of the scaled scores.
      chunk: keys per block; None or >= S = one block (still recomputed, not stored).

    Returns:
      [B, T, N, H] in q's dtype.
    """
    s_len = k.shape[1]
    c = s_len if chunk is None or chunk >= s_len else int(chunk)
    pad = (-s_len) % c
    if pad:
        # Padded keys are masked out, so they get zero weight and zero gradient.
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, pad)))
    return _flash(q, k, v, mask, float(scale), softcap, c)


def _grouped(x: jax.Array, kh: int) -> jax.Array:
    b, t, n, h = x.shape
    return x.reshape(b, t, kh, n // kh, h)


def _blocks(x: jax.Array, c: int, axis: int) -> jax.Array:
    """Splits ``axis`` (length S) into S // c blocks, moved to the front: [S//c, ...]."""
    shape = x.shape[:axis] + (x.shape[axis] // c, c) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _scores(qg, kc, scale, softcap):
    """Scaled (and capped) scores [B, K, G, T, C] in float32, plus tanh for the backward."""
    s = jnp.einsum("btkgh,bskh->bkgts", qg, kc, preferred_element_type=_F32) * scale
    if softcap is None:
        return s, None
    th = jnp.tanh(s / softcap)
    return th * softcap, th


def _forward(q, k, v, mask, scale, softcap, c):
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = _grouped(q, kh)
    mask5 = mask[:, :, None]  # [B, 1, 1, T, S]: broadcasts over K and G

    def block(carry, xs):
        m, den, acc = carry
        kc, vc, mc = xs
        s, _ = _scores(qg, kc, scale, softcap)
        s = jnp.where(mc, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        # Rows with nothing visible yet keep a finite base, so exp() gives 0, not NaN.
        base = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - base[..., None])
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m, -jnp.inf) - base)
        den = den * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(v.dtype), vc, preferred_element_type=_F32)
        return (m_new, den, acc * corr[..., None] + pv), None

    g = n // kh
    init = (
        jnp.full((b, kh, g, t), -jnp.inf, _F32),
        jnp.zeros((b, kh, g, t), _F32),
        jnp.zeros((b, kh, g, t, h), _F32),
    )
    if c == k.shape[1]:
        (m, den, acc), _ = block(init, (k, v, mask5))
    else:
        xs = (_blocks(k, c, 1), _blocks(v, c, 1), _blocks(mask5, c, 4))
        (m, den, acc), _ = jax.lax.scan(block, init, xs)
    visible = den > 0
    out = jnp.where(visible[..., None], acc / jnp.where(visible, den, 1.0)[..., None], 0.0)
    lse = jnp.where(visible, m + jnp.log(jnp.where(visible, den, 1.0)), jnp.inf)
    out = jnp.moveaxis(out, 3, 1).reshape(b, t, n, h).astype(q.dtype)  # [B, T, N, H]
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, mask, scale, softcap, c):
    return _forward(q, k, v, mask, scale, softcap, c)[0]


def _flash_fwd(q, k, v, mask, scale, softcap, c):
    out, lse = _forward(q, k, v, mask, scale, softcap, c)
    return out, (q, k, v, mask, out, lse)


def _flash_bwd(scale, softcap, c, res, do):
    q, k, v, mask, out, lse = res
    kh = k.shape[2]
    qg, dog = _grouped(q, kh), _grouped(do, kh)
    # delta_t = sum_h dO * O: the softmax Jacobian's row term, [B, K, G, T].
    delta = jnp.einsum("btkgh,btkgh->bkgt", dog.astype(_F32), _grouped(out, kh).astype(_F32))
    mask5 = mask[:, :, None]

    def block(dq, xs):
        kc, vc, mc = xs
        s, th = _scores(qg, kc, scale, softcap)
        p = jnp.where(mc, jnp.exp(s - lse[..., None]), 0.0)  # [B, K, G, T, C]
        dv = jnp.einsum("bkgts,btkgh->bskh", p.astype(do.dtype), dog, preferred_element_type=_F32)
        dp = jnp.einsum("btkgh,bskh->bkgts", dog, vc, preferred_element_type=_F32)
        ds = p * (dp - delta[..., None])
        if th is not None:
            ds = ds * (1.0 - th * th)
        ds = (ds * scale).astype(q.dtype)
        dq = dq + jnp.einsum("bkgts,bskh->btkgh", ds, kc, preferred_element_type=_F32)
        dk = jnp.einsum("bkgts,btkgh->bskh", ds, qg, preferred_element_type=_F32)
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq0 = jnp.zeros(qg.shape, _F32)
    if c == k.shape[1]:
        dq, (dk, dv) = block(dq0, (k, v, mask5))
    else:
        xs = (_blocks(k, c, 1), _blocks(v, c, 1), _blocks(mask5, c, 4))
        dq, (dk, dv) = jax.lax.scan(block, dq0, xs)
        dk = jnp.moveaxis(dk, 0, 1).reshape(k.shape)
        dv = jnp.moveaxis(dv, 0, 1).reshape(v.shape)
    return dq.reshape(q.shape).astype(q.dtype), dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
