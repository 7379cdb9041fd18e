"""Building blocks shared by every model family.

Every parameter is an ``nnx.Variable`` whose ``axes`` metadata names its logical axes
(``embed``, ``mlp``, ``heads``, ``kv_heads``, ``vocab``, ``layers``, ``lora_rank``...);
``jaxtune.sharding`` maps those names to mesh axes. Models never name mesh axes.

Layers may be *stacked*: built with ``lead=(L,)`` their parameters get a leading
``layers`` axis so the model can ``lax.scan`` over depth (compile time flat in depth).
Inside the scan body the same module code sees one layer's slice, so nothing here
depends on whether it is stacked.

Shapes use: B batch, T query length, S key length, D embed, N query heads,
K kv heads, H head dim, F mlp hidden, V vocab, R LoRA rank.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.models.quantized import QuantizedKernel

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs | None, init, shape: Sequence[int], dtype, axes: Axes) -> nnx.Param:
    """A parameter with logical ``axes``; ``rngs=None`` means zeros (abstract loads)."""
    assert len(shape) == len(axes), (shape, axes)
    value = init(rngs.params(), tuple(shape), dtype) if rngs is not None else None
    if value is None:
        value = jnp.zeros(tuple(shape), dtype)
    return nnx.Param(value, axes=tuple(axes))


def lead_axes(lead: Sequence[int]) -> Axes:
    return ("layers",) * len(lead)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def lora_matmul(
    x: jax.Array, xd: jax.Array, kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float
):
    """``x @ kernel + scale * (xd @ a) @ b`` with a hand-written backward pass.

    x: [M, in]; xd: [M, in], x after LoRA dropout (or x itself); kernel: [in, out];
    a: [in, R]; b: [R, out] -> [M, out].

    Why: left to autodiff, XLA on CPU lays the rank-R backward out badly: it scales the
    full [M, out] cotangent, and it materialises transposed copies of the [M, in]
    activations to contract them over the token axis (measured: ~30% of a LoRA step on
    the bench-tiny Llama). Here the scale lands on the small [M, R] intermediate, and
    the factor gradients contract token-major operands (``gh^T @ xd``, ``h^T @ g``),
    whose transposes are rank-sized. The kernel's gradient is written out too, so a
    trainable base weight stays correct; XLA drops it when the kernel is frozen. The
    dropout itself stays outside (autodiff carries ``xd``'s cotangent through it).
    """
    return x @ kernel + ((xd @ a) * scale) @ b


def _lora_matmul_fwd(x, xd, kernel, a, b, scale):
    h = (xd @ a) * scale  # [M, R]
    return x @ kernel + h @ b, (x, xd, kernel, a, b, h)


def _lora_matmul_bwd(scale, res, g):
    x, xd, kernel, a, b, h = res
    gh = (g @ b.T) * scale  # [M, R]
    dx = g @ kernel.T
    dxd = gh @ a.T
    dkernel = x.T @ g
    da = (gh.T @ xd).T
    db = h.T @ g
    return dx, dxd, dkernel.astype(kernel.dtype), da.astype(a.dtype), db.astype(b.dtype)


lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


def _mix32(x: jax.Array) -> jax.Array:
    # Wellons' "lowbias32" integer hash: a bijection on uint32 with low output bias.
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout of ``x`` [..., D]; identity when ``rate`` is 0 or ``key`` is None.

    The keep mask is a counter-based hash of each element's (row, column) index and two
    words drawn from ``key``, not ``jax.random.bernoulli``: threefry over every
    activation dominated the TPU compile of a LoRA step (75 s vs 31 s for one 8B step
    at 8 x 256) and its run time, while a hash of the *global* index is as cheap as a
    few elementwise ops, gives the same mask however the array is sharded, and is
    exactly reproducible on resume. Masks differ across keys (steps, layers, modules).
    """
    if rate <= 0.0 or key is None:
        return x
    s0, s1 = (jax.random.bits(key, (2,), jnp.uint32)[i] for i in range(2))
    *lead, cols = x.shape
    row = jnp.zeros(lead, jnp.uint32)
    for axis, n in enumerate(lead):
        row = row * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, tuple(lead), axis)
    col = _mix32(jnp.arange(cols, dtype=jnp.uint32) ^ s1)  # [D]
    bits = _mix32(_mix32(row ^ s0)[..., None] ^ col)  # [..., D]
    # keep with probability 1 - rate: compare against rate * 2**32 (uint32 threshold).
    threshold = jnp.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))
    keep = bits >= threshold
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def token_blocked(fn, x: jax.Array, blocks: int, rngs=None) -> jax.Array:
    """Runs a row-wise ``fn(x, rngs)`` (an MLP) over ``blocks`` blocks of tokens.

    Args:
      fn: ``(x [..., D], rngs) -> [..., D']``, independent per token row.
      x: [..., D].
      blocks: 1 = one call. Else the rows [M, D], padded to a multiple of ``blocks``,
        are visited one block after the other (``lax.map``), each under
        ``jax.checkpoint``: the backward pass recomputes a block's [M / blocks, ffn]
        intermediates rather than keeping them for all tokens (``model.mlp_chunks``).
      rngs: tuple of dropout keys (or Nones) or None; folded with the block index.

    Returns:
      [..., D'].
    """
    if blocks <= 1:
        return fn(x, rngs)
    lead, d = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, d)
    m = rows.shape[0]
    size = -(-m // blocks)
    rows = jnp.pad(rows, ((0, size * blocks - m), (0, 0)))  # zero rows, sliced off

    def one(args):
        xb, i = args
        fold = lambda k: k if k is None else jax.random.fold_in(k, i)  # noqa: E731
        return fn(xb, None if rngs is None else tuple(map(fold, rngs)))

    out = jax.lax.map(jax.checkpoint(one), (rows.reshape(blocks, size, d), jnp.arange(blocks)))
    return out.reshape(blocks * size, -1)[:m].reshape(*lead, -1)


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with optional LoRA / DoRA factors.

    kernel: [*lead, in, out]. LoRA (set by ``jaxtune.peft.lora``) adds ``lora_a``
    [*lead, in, R] and ``lora_b`` [*lead, R, out] as ``nnx.LoRAParam``; DoRA also adds
    ``dora_m`` [*lead, out]. The base parameter paths (``.../kernel``) never change, so
    a base checkpoint loads into a model with adapters as-is.

    ``jaxtune.quant`` may replace ``kernel`` by a frozen
    :class:`~jaxtune.models.quantized.QuantizedKernel` (int8 / nf4 codes + scales); it is then
    dequantized on the fly to x's dtype, in the forward and again in the backward pass.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str | None, str | None],
        *,
        use_bias: bool = False,
        lead: Sequence[int] = (),
        dtype=jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs | None,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = param(
            rngs,
            nnx.initializers.normal(init_std),
            (*lead, in_features, out_features),
            dtype,
            (*lead_axes(lead), *axes),
        )
        self.bias = (
            param(
                rngs,
                nnx.initializers.zeros,
                (*lead, out_features),
                dtype,
                (*lead_axes(lead), axes[1]),
            )
            if use_bias
            else None
        )
        # Filled in by jaxtune.peft.lora; None keeps the plain linear path. Declared as
        # data (not static) so LoRA variables can be assigned into the slots later.
        self.lora_a: nnx.LoRAParam | None = nnx.data(None)
        self.lora_b: nnx.LoRAParam | None = nnx.data(None)
        self.dora_m: nnx.LoRAParam | None = nnx.data(None)
        self.lora_scale: float = 0.0
        self.lora_dropout: float = 0.0

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """x: [..., in] -> [..., out] in x's dtype."""
        if x.ndim > 2:
            # Token-major 2-D operands: with [B, T, in] the weight gradient contracts two
            # axes, and XLA (CPU) then writes a transposed copy of every [B, T, out]
            # cotangent and falls back to a slower dot (measured: ~25% of a full
            # fine-tuning step). Row-major flattening keeps dropout masks unchanged.
            lead = x.shape[:-1]
            return self(x.reshape(-1, x.shape[-1]), rng).reshape(*lead, -1)
        if isinstance(self.kernel, QuantizedKernel):
            # Never materialise the dequantized kernel outside this call (see qmatmul).
            matmul = self.kernel.matmul
        else:
            kernel = self.kernel[...].astype(x.dtype)
            matmul = lambda v: v @ kernel  # noqa: E731
        if self.dora_m is not None:
            return self._dora(x, matmul, rng)
        if self._fused_lora():
            a = self.lora_a[...].astype(x.dtype)
            b = self.lora_b[...].astype(x.dtype)
            xd = self._dropout(x, rng)
            y = lora_matmul(x, xd, kernel, a, b, float(self.lora_scale))
        else:
            y = matmul(x)
            if self.lora_a is not None:
                y = y + self._lora_delta(x, rng)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y

    def _fused_lora(self) -> bool:
        # The hand-written backward of ``lora_matmul`` covers one dense 2-D kernel (with
        # or without dropout); everything else takes the plain autodiff path.
        return (
            self.lora_a is not None
            and not isinstance(self.kernel, QuantizedKernel)
            and self.kernel[...].ndim == 2
            and self.lora_a[...].ndim == 2
        )

    def _dropout(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        return dropout(x, self.lora_dropout, rng)

    def _lora_delta(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        a = self.lora_a[...].astype(x.dtype)
        b = self.lora_b[...].astype(x.dtype)
        return (self._dropout(x, rng) @ a) @ b * jnp.asarray(self.lora_scale, x.dtype)

    def _dora(self, x: jax.Array, matmul, rng: jax.Array | None) -> jax.Array:
        # DoRA (Liu et al. 2024), as PEFT computes it: W' = m * (W + s*A@B) / ||W + s*A@B||
        # with the column norm over the input dim, treated as a constant in the backward
        # pass. Written as base + correction; like PEFT, with dropout active the
        # magnitude correction sees the dropped-out input too:
        #   y = x@W + (m/n - 1) * drop(x)@W + (m/n) * s * drop(x)@A@B  (+ bias)
        # ``matmul(v)`` is v @ W; the dense W here only feeds the (constant) norm.
        kernel = self.kernel[...].astype(x.dtype)
        a = self.lora_a[...].astype(x.dtype)
        b = self.lora_b[...].astype(x.dtype)
        scale = jnp.asarray(self.lora_scale, x.dtype)
        w = kernel + scale * (a @ b)  # [in, out]
        norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=0)))
        mag = self.dora_m[...].astype(jnp.float32) / norm  # [out]
        mag = mag.astype(x.dtype)
        base = matmul(x)
        xd = self._dropout(x, rng)
        base_d = base if xd is x else matmul(xd)
        lora = (xd @ a) @ b * scale
        y = base + (mag - 1) * base_d + mag * lora
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table [V, D]; ``attend`` gives tied output logits."""

    def __init__(self, vocab: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None):
        self.embedding = param(
            rngs, nnx.initializers.normal(0.02), (vocab, dim), dtype, ("vocab", "embed")
        )

    def __call__(self, ids: jax.Array, dtype=None) -> jax.Array:
        """ids: int [B, T] -> [B, T, D]."""
        table = self.embedding[...]
        return jnp.take(table, ids, axis=0).astype(dtype or table.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> logits [..., V]."""
        # 2-D for the same reason as Linear: the tied embedding's gradient then
        # contracts one token axis instead of two.
        x2 = x.reshape(-1, x.shape[-1])
        return (x2 @ self.embedding[...].astype(x.dtype).T).reshape(*x.shape[:-1], -1)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32; ``unit_offset`` gives Gemma's ``(1 + w)`` scale."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        unit_offset: bool = False,
        lead: Sequence[int] = (),
        dtype=jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        # Norm scales are deterministic (ones, or zeros for the (1 + w) form): no rngs.
        value = (jnp.zeros if unit_offset else jnp.ones)((*lead, dim), dtype)
        self.scale = nnx.Param(value, axes=(*lead_axes(lead), "norm"))
        self.eps = eps
        self.unit_offset = unit_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., D] in x's dtype."""
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
        w = self.scale[...].astype(jnp.float32)
        if self.unit_offset:
            # HF Gemma scales in float32 and casts once at the end.
            return ((1.0 + w) * h).astype(x.dtype)
        # HF Llama casts the normalised activations back before scaling; matching the
        # order keeps bf16 parity too.
        return (w * h.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm (GPT-2 family) with scale and bias [*lead, D], computed in float32."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-5,
        lead: Sequence[int] = (),
        dtype=jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        axes = (*lead_axes(lead), "norm")
        self.scale = nnx.Param(jnp.ones((*lead, dim), dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((*lead, dim), dtype), axes=axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., D] in x's dtype (biased variance, like torch)."""
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        w = self.scale[...].astype(jnp.float32)
        return (h * w + self.bias[...].astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies [H/2] for rotate-half RoPE, with HF's scaling rules.

    Supported ``scaling['rope_type']``: ``default``, ``linear``, ``llama3``.
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        pass
    elif kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    else:
        raise ValueError(f"unsupported rope_type {kind!r}")
    return inv.astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions: int [B, T] -> (cos, sin), each float32 [B, T, H]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """HF-style rotate-half RoPE. x: [B, T, N, H]; cos/sin: [B, T, H]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c = cos[:, :, None, :].astype(jnp.float32)
    s = sin[:, :, None, :].astype(jnp.float32)
    out = x.astype(jnp.float32) * c + rotated.astype(jnp.float32) * s
    return out.astype(x.dtype)


# ------------------------------------------------------------------------ attention


def attention_mask(
    q_index: jax.Array,
    kv_index: jax.Array,
    kv_valid: jax.Array | None = None,
    q_segment: jax.Array | None = None,
    kv_segment: jax.Array | None = None,
    window: jax.Array | int | None = None,
    causal: bool = True,
) -> jax.Array:
    """Boolean mask [B, 1, T, S]: may query t attend to key s?

    Causality and sliding windows use token *indices* (slot in the row / cache), not
    RoPE positions, so packed rows (positions restart per segment) stay causal.

    Args:
      q_index: int [B, T] index of each query token.
      kv_index: int [B, S] index of each key token.
      kv_valid: bool/int [B, S], 0 on padding (and empty cache slots).
      q_segment / kv_segment: int [B, T] / [B, S] packed-example ids; attention only
        within equal ids.
      window: sliding window (traced or static); ``<= 0`` or None = global.
      causal: False for encoders.
    """
    q = q_index[:, :, None]
    k = kv_index[:, None, :]
    mask = jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), dtype=bool)
    if causal:
        mask = mask & (k <= q)
    if window is not None:
        w = jnp.asarray(window)
        mask = mask & ((w <= 0) | (q - k < w))
    if kv_valid is not None:
        mask = mask & (kv_valid[:, None, :] > 0)
    if q_segment is not None and kv_segment is not None:
        mask = mask & (q_segment[:, :, None] == kv_segment[:, None, :])
    return mask[:, None, :, :]
