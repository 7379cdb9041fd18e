"""Memory-efficient ("flash") attention in plain JAX, for every backend.

``jax.nn.dot_product_attention``'s XLA path keeps the full [B, N, T, S] float32
probabilities (and the mask broadcast over heads) alive for the backward pass: with
scanned layers that is one such stack per layer, written, zero-initialised and read
again every step (a quarter of a bench-tiny CPU step), and at 8B x 2048 tokens it is
1 GiB per layer on an accelerator. Here the forward pass keeps only the output and the
per-row log-sum-exp; the backward pass recomputes the probabilities from them. With
``chunk`` < S the keys are visited in blocks with an online softmax (Rabe & Staats
2021; Dao 2022), so no [.., T, S] tensor larger than [.., T, chunk] ever exists; with
``q_chunk`` < T the queries are too, one block after the other, which bounds the score
blocks at [.., q_chunk, chunk] for any sequence length.

Grouped-query attention is native (no repeated K/V); the boolean mask is the usual
[B, 1, T, S] one (causal, padding, packed segments, sliding windows), so every model
can use it unchanged. Fully masked query rows give zeros, with zero gradients.

:func:`blocked_attention` is the fast path on CPU at training lengths: exact attention
by blocks of queries, each reading only the keys it can see (causal models skip the
blocks above the diagonal), with the probabilities kept for autodiff.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_F32 = jnp.float32

# Keys per block of the flash path: [B, N, T, 512] float32 scores at most per block.
FLASH_CHUNK = 512
# Queries per flash block: bounds the float32 score blocks (2 x 2048 tokens of Llama 8B:
# 256 -> 128 MiB each); the 8B QLoRA plan's peak was lowest at 1024 (512: XLA kept more).
FLASH_Q_CHUNK = 1024
# ``auto`` on CPU: the blocked path (probabilities kept for the backward pass) while one
# layer's full [B, N, T, S] float32 scores stay within this; flash beyond it.
BLOCKED_MAX_BYTES = 64 << 20
# Queries per block of the blocked path (bench-tiny per-layer fwd+bwd on an AVX-512 EPYC,
# T=256: 32 -> 39 ms, 64 -> 37, 128 -> 42; T=512: 155 / 131 / 136 ms).
BLOCKED_Q_BLOCK = 64


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    chunk: int | None = None,
    q_chunk: int | None = None,
) -> jax.Array:
    """Attention without a stored [B, N, T, S] probability tensor.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H], N a multiple of K (grouped queries).
      mask: bool [B, 1, T, S]; True where query t may attend to key s.
      scale: multiplier of q·k.
      softcap: Gemma 2 style ``tanh`` capping of the scaled scores.
      chunk: keys per block; None or >= S = one block (still recomputed, not stored).
      q_chunk: queries per block, one block after the other in both passes; None or
        >= T = all at once. The largest temporaries are [B, N, q_chunk, chunk] float32
        score blocks (8B at 2 x 2048 tokens, all queries at once: 256 MiB each).

    Returns:
      [B, T, N, H] in q's dtype.
    """
    t_len, s_len = q.shape[1], k.shape[1]
    qc = None if q_chunk is None or q_chunk >= t_len else int(q_chunk)
    q_pad = (-t_len) % qc if qc else 0
    if q_pad:
        # Padded queries see no key: zero output, zero gradient; sliced off below.
        q = jnp.pad(q, ((0, 0), (0, q_pad), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, q_pad), (0, 0)))
    c = s_len if chunk is None or chunk >= s_len else int(chunk)
    pad = (-s_len) % c
    if pad:
        # Padded keys are masked out, so they get zero weight and zero gradient.
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, pad)))
    out = _flash(q, k, v, mask, float(scale), softcap, c, qc)
    return out[:, :t_len] if q_pad else out


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


def _forward_chunked(q, k, v, mask, scale, softcap, c, qc):
    """_forward over query blocks of ``qc`` (None = one block): (out, lse)."""
    if qc is None:
        return _forward(q, k, v, mask, scale, softcap, c)

    def one(xs):
        return _forward(xs[0], k, v, xs[1], scale, softcap, c)

    outs, lses = jax.lax.map(one, (_blocks(q, qc, 1), _blocks(mask, qc, 2)))
    return _unblock(outs, 1), _unblock(lses, 3)


def _unblock(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of ``_blocks``: [n, ...] with blocks along ``axis`` -> joined ``axis``."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, mask, scale, softcap, c, qc):
    return _forward_chunked(q, k, v, mask, scale, softcap, c, qc)[0]


def _flash_fwd(q, k, v, mask, scale, softcap, c, qc):
    out, lse = _forward_chunked(q, k, v, mask, scale, softcap, c, qc)
    return out, (q, k, v, mask, out, lse)


def _backward(q, k, v, mask, out, lse, do, scale, softcap, c):
    """Gradients (dq in q's dtype, dk and dv in float32) for one block of queries."""
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
        return dq, (dk, dv)

    dq0 = jnp.zeros(qg.shape, _F32)
    if c == k.shape[1]:
        dq, (dk, dv) = block(dq0, (k, v, mask5))
    else:
        xs = (_blocks(k, c, 1), _blocks(v, c, 1), _blocks(mask5, c, 4))
        dq, (dk, dv) = jax.lax.scan(block, dq0, xs)
        dk, dv = _unblock(dk, 1), _unblock(dv, 1)
    return dq.reshape(q.shape).astype(q.dtype), dk, dv


def _flash_bwd(scale, softcap, c, qc, res, do):
    q, k, v, mask, out, lse = res
    if qc is None:
        dq, dk, dv = _backward(q, k, v, mask, out, lse, do, scale, softcap, c)
    else:
        # Query blocks in turn; dk and dv summed over them in float32.
        def one(acc, xs):
            qi, mi, oi, li, doi = xs
            dqi, dki, dvi = _backward(qi, k, v, mi, oi, li, doi, scale, softcap, c)
            return (acc[0] + dki, acc[1] + dvi), dqi

        xs = tuple(_blocks(x, qc, ax) for x, ax in ((q, 1), (mask, 2), (out, 1), (lse, 3), (do, 1)))
        zeros = (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32))
        (dk, dv), dqs = jax.lax.scan(one, zeros, xs)
        dq = _unblock(dqs, 1)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    causal: bool = False,
    block: int = 64,
) -> jax.Array:
    """Exact attention by query blocks; causal models skip the keys after each block.

    Why, on CPU: XLA runs every elementwise op of attention as its own pass over the
    [B, N, T, S] scores, and on a CPU those passes (not the matmuls) set the pace. With
    queries in blocks of ``block``, each pass runs over [B, N, block, S] blocks that
    stay closer to the caches, and with ``causal`` block i reads only keys
    ``[0, end_i)``: (nb + 1) / (2 nb) of the work. Measured on an AVX-512 EPYC, bench-tiny
    shapes (8 x 256 tokens, 8 heads of 64), forward + backward per layer: 37 ms against
    89 ms for :func:`flash_attention` and 80 ms for ``jax.nn.dot_product_attention``
    (torch's SDPA: 32 ms). The probabilities (about half of [B, N, T, S] float32 when
    causal) are kept for the backward pass, so this is for lengths where they are
    small; :func:`dot_product_attention` chooses.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H], N a multiple of K (grouped queries).
      mask: bool [B, 1, T, S]; True where query t may attend to key s.
      scale: multiplier of q·k.
      softcap: Gemma 2 style ``tanh`` capping of the scaled scores.
      causal: queries and keys share one index space (T == S, no cache) and key s > t
        is always masked; blocks then skip those keys. The mask still applies.
      block: queries per block.

    Returns:
      [B, T, N, H] in q's dtype. Fully masked query rows give zeros, with zero gradients.
    """
    b, t, n, h = q.shape
    s_len, kh = k.shape[1], k.shape[2]
    if causal and s_len != t:
        raise ValueError(f"causal attention needs as many keys as queries, got {t} and {s_len}")
    # Head-major operands once, so every block's matmuls batch over leading axes.
    qh = jnp.moveaxis(_grouped(q, kh), 1, 3)  # [B, K, G, T, H]
    kt, vt = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)  # [B, K, S, H]
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        keys = end if causal else s_len
        s = jnp.einsum(
            "bkgth,bksh->bkgts", qh[:, :, :, start:end], kt[:, :, :keys],
            preferred_element_type=_F32,
        ) * scale  # fmt: skip
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        s = jnp.where(mask[:, :, None, start:end, :keys], s, -jnp.inf)
        # The shift cancels in the softmax: no gradient through it. Rows with no visible
        # key keep a finite shift, so exp() gives 0 and the row 0, not NaN.
        top = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - jnp.where(jnp.isfinite(top), top, 0.0))
        den = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum(
            "bkgts,bksh->bkgth", p.astype(v.dtype), vt[:, :, :keys], preferred_element_type=_F32
        )
        outs.append(o / jnp.where(den > 0, den, 1.0))
    out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]  # [B, K, G, T, H]
    return jnp.moveaxis(out, 3, 1).reshape(b, t, n, h).astype(q.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    implementation: str | None = None,
    causal: bool = False,
) -> jax.Array:
    """Grouped-query attention.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K.
      mask: bool [B, 1, T, S].
      scale: multiplier of q·k.
      softcap: Gemma 2 style ``tanh`` capping of the scores (every path).
      implementation: ``flash`` (jaxtune.models.attention: no stored [B, N, T, S]
        probabilities, keys in blocks of ``FLASH_CHUNK``, queries of ``FLASH_Q_CHUNK``),
        ``blocked`` (exact, by blocks of ``BLOCKED_Q_BLOCK`` queries, probabilities kept:
        the fastest on CPU), ``xla`` / ``cudnn`` (``jax.nn.dot_product_attention``), or
        None / ``auto``: cuDNN-or-XLA on GPU; on CPU ``blocked`` while one layer's
        [B, N, T, S] float32 scores fit ``BLOCKED_MAX_BYTES``, else ``flash``; ``flash``
        on TPU.
      causal: T == S in one index space (no cache) and key s > t always masked: the
        blocked path then skips those keys (the mask is applied all the same).

    Returns:
      [B, T, N, H] in q's dtype. Fully masked query rows give zeros (``flash``, ``blocked``).
    """
    impl = implementation or "auto"
    if impl == "auto":
        backend = jax.default_backend()
        scores = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1] * 4
        if backend == "gpu":
            impl = "gpu"
        elif backend == "cpu" and scores <= BLOCKED_MAX_BYTES:
            impl = "blocked"
        else:
            impl = "flash"
    if impl == "flash":
        return flash_attention(
            q, k, v, mask, scale=scale, softcap=softcap, chunk=FLASH_CHUNK, q_chunk=FLASH_Q_CHUNK
        )
    if impl == "blocked":
        return blocked_attention(
            q, k, v, mask, scale=scale, softcap=softcap, causal=causal, block=BLOCKED_Q_BLOCK
        )
    if softcap is None:
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=scale, implementation=None if impl == "gpu" else impl
        )
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k).astype(jnp.float32) * scale
    scores = jnp.tanh(scores / softcap) * softcap
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)
