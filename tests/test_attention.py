"""Flash and blocked attention (jaxtune.models.attention) against jax.nn.dot_product_attention's
XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtune.models.attention as attention
from jaxtune.models.attention import blocked_attention, dot_product_attention, flash_attention
from jaxtune.models.layers import attention_mask

B, T, N, K, H = 2, 37, 4, 2, 16


def _inputs(dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), dtype)
    k = jax.random.normal(ks[1], (B, T, K, H), dtype)
    v = jax.random.normal(ks[2], (B, T, K, H), dtype)
    w = jax.random.normal(ks[3], (B, T, N, H), jnp.float32)
    idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    # Row 1 is left-padded: its first 5 queries see nothing at all.
    valid = jnp.ones((B, T), jnp.int32).at[1, :5].set(0)
    seg = jnp.concatenate([jnp.ones((B, 20), jnp.int32), jnp.full((B, T - 20), 2, jnp.int32)], 1)
    mask = attention_mask(idx, idx, valid, seg, seg, window=9)
    return q, k, v, w, mask


def _reference(q, k, v, mask, softcap):
    out = dot_product_attention(q, k, v, mask, scale=H**-0.5, softcap=softcap, implementation="xla")
    # The XLA path averages V over a fully masked row; flash defines it as zero.
    seen = mask.any(-1)[:, 0, :, None, None]
    return jnp.where(seen, out, 0.0)


def _assert_matches_xla(attn, q, k, v, w, mask, softcap):
    """``attn(q, k, v)``: values and q/k/v gradients of a weighted sum equal XLA's."""
    ref = lambda q, k, v: _reference(q, k, v, mask, softcap)  # noqa: E731
    np.testing.assert_allclose(attn(q, k, v), ref(q, k, v), atol=2e-6)
    grads = [
        jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
        for f in (attn, ref)
    ]
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(got, want, atol=5e-6)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize(("chunk", "q_chunk"), [(None, None), (8, None), (16, 10), (64, 8)])
def test_flash_matches_xla_values_and_gradients(softcap, chunk, q_chunk):
    # chunk 8/16 and q_chunk 10/8 do not divide T=37: padded keys must be invisible,
    # padded queries dropped; dk/dv sum over the query blocks.
    q, k, v, w, mask = _inputs()
    flash = lambda q, k, v: flash_attention(  # noqa: E731
        q, k, v, mask, scale=H**-0.5, softcap=softcap, chunk=chunk, q_chunk=q_chunk
    )
    _assert_matches_xla(flash, q, k, v, w, mask, softcap)


def test_fully_masked_rows_are_zero_with_zero_gradient():
    q, k, v, w, mask = _inputs()
    out = flash_attention(q, k, v, mask, scale=H**-0.5, chunk=16)
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_array_equal(out[1, :5], 0.0)
    dq = jax.grad(lambda q: jnp.sum(flash_attention(q, k, v, mask, scale=H**-0.5) * w))(q)
    np.testing.assert_array_equal(dq[1, :5], 0.0)
    assert float(jnp.abs(dq[1, 5:]).max()) > 0


def test_bfloat16_inputs_keep_their_dtype_and_stay_close():
    q, k, v, w, mask = _inputs(jnp.bfloat16)
    out = flash_attention(q, k, v, mask, scale=H**-0.5, chunk=16)
    assert out.dtype == jnp.bfloat16
    want = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), mask, None)
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=3e-2)
    dq, dk, dv = jax.grad(
        lambda *a: jnp.sum(flash_attention(*a, mask, scale=H**-0.5).astype(jnp.float32) * w),
        argnums=(0, 1, 2),
    )(q, k, v)
    assert dq.dtype == dk.dtype == dv.dtype == jnp.bfloat16


def _shapes(hlo: str, t: int, s: int) -> set[str]:
    """Array shapes in ``hlo`` whose last two dims are (t, s)."""
    import re

    return set(re.findall(rf"\w+\[[\d,]*{t},{s}\]", hlo))


def test_no_full_score_matrix_is_kept_for_the_backward_pass():
    # T = S = 128 keys in blocks of 32: no [.., 128, 128] array may appear anywhere in
    # the compiled gradient (the XLA path stores the [B, N, T, S] probabilities).
    t = 128
    q = jnp.ones((1, t, N, H))
    kv = jnp.ones((1, t, K, H))
    idx = jnp.arange(t)[None]
    mask = attention_mask(idx, idx)

    def loss(impl, q, k, v):
        if impl == "flash":
            out = flash_attention(q, k, v, mask, scale=0.25, chunk=32)
        else:
            out = dot_product_attention(q, k, v, mask, scale=0.25, implementation="xla")
        return jnp.sum(out)

    def hlo(impl):
        g = jax.jit(jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2)))
        return g.lower(q, kv, kv).compile().as_text()

    scores = {s for s in _shapes(hlo("flash"), t, t) if not s.startswith("pred")}
    assert scores == set(), scores
    assert _shapes(hlo("xla"), t, t), "the check itself must see the XLA path's scores"
    assert _shapes(hlo("flash"), t, 32), "flash must work in [.., T, 32] blocks"


def test_query_blocks_bound_the_score_blocks():
    # With queries in blocks of 16 as well, no float score block has 128 query rows.
    t = 128
    q, kv = jnp.ones((1, t, N, H)), jnp.ones((1, t, K, H))
    idx = jnp.arange(t)[None]
    mask = attention_mask(idx, idx)

    def hlo(q_chunk):
        def loss(q, k, v):
            return jnp.sum(flash_attention(q, k, v, mask, scale=0.25, chunk=32, q_chunk=q_chunk))

        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return g.lower(q, kv, kv).compile().as_text()

    def float_blocks(text, rows):
        return {s for s in _shapes(text, rows, 32) if s.startswith(("f32", "bf16"))}

    assert float_blocks(hlo(None), t), "the check itself must see [.., 128, 32] blocks"
    assert not float_blocks(hlo(16), t)
    assert float_blocks(hlo(16), 16)


def _encoder_mask():
    """A non-causal mask (padding + packed segments), as an encoder's."""
    idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    valid = jnp.ones((B, T), jnp.int32).at[1, 30:].set(0)
    seg = jnp.concatenate([jnp.ones((B, 20), jnp.int32), jnp.full((B, T - 20), 2, jnp.int32)], 1)
    return attention_mask(idx, idx, valid, seg, seg, causal=False)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [8, 16, 64])
def test_blocked_matches_xla_values_and_gradients(softcap, causal, block):
    # Blocks of 8/16 do not divide T=37 (a short last block); 64 is one block. The
    # causal mask also pads, packs segments and slides a window; the encoder mask
    # pads the end of row 1 (its padded queries still see the valid keys).
    q, k, v, w, mask = _inputs()
    if not causal:
        mask = _encoder_mask()
    blocked = lambda q, k, v: blocked_attention(  # noqa: E731
        q, k, v, mask, scale=H**-0.5, softcap=softcap, causal=causal, block=block
    )
    _assert_matches_xla(blocked, q, k, v, w, mask, softcap)


def test_blocked_fully_masked_rows_are_zero_with_zero_gradient_and_dtype_kept():
    q, k, v, w, mask = _inputs()
    out = blocked_attention(q, k, v, mask, scale=H**-0.5, causal=True, block=16)
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_array_equal(out[1, :5], 0.0)
    dq = jax.grad(
        lambda q: jnp.sum(blocked_attention(q, k, v, mask, scale=H**-0.5, causal=True) * w)
    )(q)
    assert bool(jnp.isfinite(dq).all())
    np.testing.assert_array_equal(dq[1, :5], 0.0)
    assert float(jnp.abs(dq[1, 5:]).max()) > 0
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = blocked_attention(qb, kb, vb, mask, scale=H**-0.5, causal=True, block=16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), _reference(q, k, v, mask, None), atol=3e-2)


def test_blocked_causal_skips_the_keys_after_each_block():
    # T = 128 in blocks of 32: causal block i scores only keys [0, 32 (i + 1)); without
    # ``causal`` every block scores all 128 keys.
    t = 128
    q, kv = jnp.ones((1, t, N, H)), jnp.ones((1, t, K, H))
    idx = jnp.arange(t)[None]
    mask = attention_mask(idx, idx)

    def hlo(causal):
        def loss(q, k, v):
            return jnp.sum(blocked_attention(q, k, v, mask, scale=0.25, causal=causal, block=32))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile().as_text()

    def widths(text):
        return {s for s in (32, 64, 96, 128) if {x for x in _shapes(text, 32, s) if x[0] == "f"}}

    assert widths(hlo(True)) == {32, 64, 96, 128}
    assert widths(hlo(False)) == {128}
    with pytest.raises(ValueError, match="as many keys as queries"):
        blocked_attention(q[:, :64], kv, kv, mask[:, :, :64], scale=0.25, causal=True)


def test_auto_is_blocked_on_cpu_while_the_scores_are_small(monkeypatch):
    # auto = blocked (no custom_vjp) for small scores, flash (custom_vjp) beyond the cap.
    q, k, v, _, mask = _inputs()

    def jaxpr():
        f = lambda q: dot_product_attention(q, k, v, mask, scale=0.25, causal=True)  # noqa: E731
        return str(jax.make_jaxpr(f)(q))

    assert jax.default_backend() == "cpu"
    assert "custom_vjp" not in jaxpr()
    monkeypatch.setattr(attention, "BLOCKED_MAX_BYTES", B * N * T * T * 4 - 1)
    assert "custom_vjp" in jaxpr()
