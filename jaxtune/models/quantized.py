"""Quantized kernel storage (``int8``, ``nf4``) and its matmul: the primitives under ``Linear``.

QLoRA-style quantized storage of frozen base weights. Quantizing a whole model (which
kernels, in place, abstract models) is :mod:`jaxtune.quant`, one layer up.

What is quantized: the kernels of every :class:`~jaxtune.models.layers.Linear` inside the
decoder/encoder stack (module path contains ``layers``: attention and MLP projections).
Embeddings, norms, biases, the LM head and classification heads stay in ``model.dtype``,
as in QLoRA. Quantized weights are frozen, so quantization needs a PEFT method
(``lora``, ``dora``, ``adapter``, ``feature``); ``full`` is rejected by the config.

Storage format (a kernel ``W`` [*lead, in, out], ``lead`` = () or (L,) when stacked):

* Blocks of ``B`` consecutive values along the *input* dim of each output column (the
  same grouping as bitsandbytes, which blocks torch's row-major [out, in] weight).
  ``B = gcd(in, 64)``: 64 for every real model (the QLoRA block size); small dims get
  smaller blocks instead of padding. One bfloat16 absmax scale per block:
  ``scales`` [*lead, in / B, out]. bfloat16 rather than float32 halves what the scales
  take (0.41 -> 0.2 GiB for Llama 3.1 8B) for a relative error of at most 2^-9 of a
  block's scale, two orders below NF4's own; codes are chosen against the rounded
  scale, so no value is pushed further than half a grid step plus that rounding.
* ``nf4``: each value is the index of the nearest of the 16 NormalFloat4 levels
  (:data:`NF4_CODEBOOK`, the QLoRA paper's / bitsandbytes' table) after dividing by the
  block's absmax. Two 4-bit indices per byte along the input dim, paired inside a block:
  byte ``r`` of block ``k`` holds row ``k*B + r`` in its high nibble and row
  ``k*B + B/2 + r`` in its low one (``codes`` uint8 [*lead, in / 2, out]). No single
  rows are ever interleaved (XLA lowered that to full-size float32 halves, padded and
  merged: 4-5 kernel-sized temporaries per dequantization in the 8B step): ``qmatmul``
  multiplies each half-block by its own half of the input, ``dequantize`` joins the
  halves end to end. 4.25 bits per weight.
* ``int8``: symmetric absmax, ``code = round(127 * w / absmax)`` in [-127, 127];
  ``codes`` int8 [*lead, in, out], ``scales`` hold ``absmax / 127``. 8.25 bits per weight.

Both arrays are :class:`QuantWeight` variables (not ``nnx.Param``: the trainable filter
only ever selects ``nnx.Param`` subclasses, so they are frozen by type) held by a
:class:`QuantizedKernel` module that takes the place of ``Linear.kernel``; their paths
are ``.../q_proj/kernel/codes`` and ``.../q_proj/kernel/scales``. Both keep the
kernel's logical axes ``(*lead_axes, in_axis, out_axis)``: the packed / blocked input
dim is still named by the kernel's input axis (``embed`` -> ``fsdp``), so FSDP splits
codes and scales along the same dim. A dim that does not divide by its mesh axis is
replicated (``jaxtune.sharding.spec_for``); shards line up with the blocks when
``in / fsdp`` is a multiple of ``B`` (4096 / 8 = 512 for Llama 8B on 8 devices).

Dequantization happens on the fly in ``Linear.__call__`` through :func:`qmatmul`, a
``custom_vjp`` whose backward pass dequantizes again instead of keeping the dequantized
kernel as a residual: with or without remat, a layer's full-precision kernel exists
only as a temporary while that layer runs (forward or backward), so scanned layers
never hold a bf16 copy of the whole stack. Quantization itself runs on the host in
numpy, one tensor (one layer slice) at a time, while weights are loaded
(``jaxtune.hf.io.load_params(quantize=...)``), so the float model never exists on the
device.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import ConfigError

FORMATS = ("int8", "nf4")
SCALE_DTYPE = np.dtype(jnp.bfloat16)
MAX_BLOCK = 64
# NormalFloat4 levels (Dettmers et al. 2023, QLoRA; bitsandbytes ``get_4bit_type("nf4")``):
# quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero.
NF4_CODEBOOK = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# Nearest level = number of midpoints below the value (searchsorted: O(n log 16)).
_NF4_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2


class QuantWeight(nnx.Variable):
    """Quantized storage (codes or scales) of a frozen kernel; never trainable."""


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"model.quantize: {fmt!r} is not one of {list(FORMATS)} (or null)")
    return fmt


def block_size(d_in: int) -> int:
    """Values per scale along the input dim: ``gcd(d_in, 64)`` (64 for real models)."""
    return math.gcd(int(d_in), MAX_BLOCK)


def _pack(fmt: str) -> int:
    return 2 if fmt == "nf4" else 1


def quantized_shapes(shape, fmt: str) -> tuple[tuple, np.dtype, tuple, np.dtype]:
    """``(codes shape, codes dtype, scales shape, scales dtype)`` for a kernel ``shape``."""
    *lead, d_in, d_out = shape
    if fmt == "nf4" and d_in % 2:
        raise ConfigError(f"model.quantize=nf4: input dim {d_in} is odd (two codes per byte)")
    codes = (*lead, d_in // _pack(fmt), d_out)
    scales = (*lead, d_in // block_size(d_in), d_out)
    return codes, np.dtype(np.uint8 if fmt == "nf4" else np.int8), scales, SCALE_DTYPE


def logical_shape(codes_shape, fmt: str) -> tuple[int, ...]:
    """Kernel shape [*lead, in, out] that ``codes`` of ``codes_shape`` stand for."""
    *lead, rows, d_out = codes_shape
    return (*lead, rows * _pack(fmt), d_out)


def quantize(w, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Host (numpy) quantization of a kernel.

    Args:
      w: float array [*lead, in, out] (numpy, or anything ``np.asarray`` takes).
      fmt: ``int8`` or ``nf4``.

    Returns:
      ``(codes, scales)``: nf4 uint8 [*lead, in/2, out] (two 4-bit indices per byte)
      or int8 [*lead, in, out]; bfloat16 scales [*lead, in/B, out], B = block_size(in).
    """
    check_format(fmt)
    w = np.asarray(w, dtype=np.float32)
    *lead, d_in, d_out = w.shape
    codes_shape, codes_dtype, scales_shape, _ = quantized_shapes(w.shape, fmt)
    b = block_size(d_in)
    blocks = w.reshape(*lead, d_in // b, b, d_out)
    absmax = np.abs(blocks).max(axis=-2)  # [*lead, in/B, out]
    if fmt == "int8":
        absmax = absmax / 127.0
    scales = absmax.astype(SCALE_DTYPE)
    # Codes against the stored (rounded) scale. An all-zero block keeps scale 0
    # (dequantizes to zeros); divide by 1 instead.
    stored = scales.astype(np.float32)
    safe = np.where(stored > 0, stored, 1.0)[..., None, :]
    if fmt == "int8":
        q = np.clip(np.rint(blocks / safe), -127, 127).astype(np.int8)
        return q.reshape(codes_shape), scales
    idx = np.searchsorted(_NF4_MIDPOINTS, blocks / safe).astype(np.uint8)  # [.., nb, B, out]
    codes = (idx[..., : b // 2, :] << 4) | idx[..., b // 2 :, :]
    codes = codes.reshape(codes_shape)
    assert codes.shape == codes_shape and codes.dtype == codes_dtype
    return codes, scales


def dequantize(codes: jax.Array, scales: jax.Array, fmt: str, dtype=jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize` (jit-able; what the forward pass runs).

    Args:
      codes: nf4 uint8 [*lead, in/2, out] or int8 [*lead, in, out].
      scales: bfloat16 (or float32) [*lead, in/B, out].
      fmt: ``int8`` or ``nf4``.
      dtype: result dtype; the arithmetic is float32, cast once per value.

    Returns:
      The kernel [*lead, in, out] in ``dtype``.
    """
    codes = jnp.asarray(codes)
    *lead, rows, d_out = codes.shape
    nb = scales.shape[-2]
    s = _row_scales(scales, rows)
    if fmt != "nf4":
        return (codes.astype(jnp.float32) * s).astype(dtype)

    def half(nibbles):  # [*lead, in/2, out] -> [*lead, nb, B/2, out] in dtype
        return (_nf4_values(nibbles) * s).astype(dtype).reshape(*lead, nb, rows // nb, d_out)

    # High nibbles are the first half of each block, low nibbles the second half.
    return jnp.concatenate([half(codes >> 4), half(codes & 0xF)], axis=-2).reshape(
        *lead, rows * 2, d_out
    )


def _row_scales(scales: jax.Array, rows: int) -> jax.Array:
    """Block scales [*lead, nb, out] -> float32 [*lead, rows, out], each repeated rows/nb
    times (one per stored row).

    Why ``repeat`` rather than broadcasting [nb, 1, out] against [nb, rows/nb, out]
    blocks: the TPU compiler fused the repeat (a gather) into the matmul operand but
    materialized the broadcast, a float32 array the size of the kernel (8B QLoRA:
    112 MiB per MLP half-kernel, two alive at the step's peak).
    """
    nb = scales.shape[-2]
    return jnp.repeat(scales, rows // nb, axis=-2, total_repeat_length=rows).astype(jnp.float32)


def _nf4_values(nibbles: jax.Array) -> jax.Array:
    """NF4 codebook lookup of uint8 codes 0..15 (any shape) -> float32, same shape.

    A tree of 15 selects on the code's bits rather than ``jnp.take``: the TPU compiler
    turned the 16-entry gather into int32 indices plus one [in, out] boolean per
    code value, ~2 GiB of live temporaries in the 8B QLoRA step; elementwise selects
    fuse into the dequantization (and the matmul operand) with no temporaries at all.
    """
    level = [jnp.float32(v) for v in NF4_CODEBOOK]
    for bit in range(4):
        on = (nibbles & (1 << bit)) != 0
        level = [jnp.where(on, level[i + 1], level[i]) for i in range(0, len(level), 2)]
    return level[0]


def _nf4_half(codes: jax.Array, scales: jax.Array, low: bool, dtype) -> jax.Array:
    """One half-kernel of nf4 ``codes`` [in/2, out]: the first (high nibbles) or second
    (``low``) half of every block, [in/2, out] in ``dtype``. Elementwise in the codes,
    so XLA can fuse it into the matmul that reads it; nothing is interleaved."""
    nibbles = codes & 0xF if low else codes >> 4
    return (_nf4_values(nibbles) * _row_scales(scales, codes.shape[-2])).astype(dtype)


def _block_halves(x: jax.Array, nb: int) -> tuple[jax.Array, jax.Array]:
    """x [..., in] -> (first, second) half of each of its ``nb`` blocks, [..., in/2] each."""
    lead = x.shape[:-1]
    xb = x.reshape(*lead, nb, 2, x.shape[-1] // (2 * nb))
    return xb[..., 0, :].reshape(*lead, -1), xb[..., 1, :].reshape(*lead, -1)


def _after(*arrays):
    # A data dependency that ties a dequantization to the activation it multiplies.
    # Without it the scheduler hoists every dequantization of a (recomputed) layer to
    # its start, so all its bf16 kernels, and their broadcast scales, are alive at once
    # (8B QLoRA step: six 56 MiB half-kernels at the peak).
    return jax.lax.optimization_barrier(arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def qmatmul(x: jax.Array, codes: jax.Array, scales: jax.Array, fmt: str) -> jax.Array:
    """``x @ dequantize(codes, scales)``: x [..., in] -> [..., out] in x's dtype.

    nf4 runs as two matmuls, one per half of every block (``x_hi @ W_hi + x_lo @ W_lo``),
    one after the other, so the packed nibbles never have to be put back in row order
    and only one half-kernel exists at a time. The kernel is frozen: the backward pass
    gives the gradient for ``x`` only and dequantizes the kernel again rather than
    saving it (memory: half of one layer's kernel, only while it is used).
    """
    codes, scales, x = _after(codes, scales, x)
    if fmt != "nf4":
        return x @ dequantize(codes, scales, fmt, x.dtype)
    x_hi, x_lo = _block_halves(x, scales.shape[-2])
    y = x_hi @ _nf4_half(codes, scales, False, x.dtype)
    codes, scales, x_lo, y = _after(codes, scales, x_lo, y)
    return y + x_lo @ _nf4_half(codes, scales, True, x.dtype)


def _qmatmul_fwd(x, codes, scales, fmt):
    return qmatmul(x, codes, scales, fmt), (codes, scales)


def _qmatmul_bwd(fmt, res, g):
    codes, scales, g = _after(*res, g)
    if fmt != "nf4":
        w = dequantize(codes, scales, fmt, g.dtype)  # [in, out]
        return jnp.einsum("...o,io->...i", g, w), None, None
    lead, nb = g.shape[:-1], scales.shape[-2]

    def dx_half(low):  # [..., nb, B/2]
        w = _nf4_half(codes, scales, low, g.dtype)
        return jnp.einsum("...o,io->...i", g, w).reshape(*lead, nb, -1)

    dx_hi = dx_half(False)
    codes, scales, g, dx_hi = _after(codes, scales, g, dx_hi)
    dx_lo = dx_half(True)
    # [..., nb, B/2] each -> [..., nb, 2, B/2]: the blocks' halves back in row order.
    return jnp.stack([dx_hi, dx_lo], axis=-2).reshape(*lead, -1), None, None


qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


class QuantizedKernel(nnx.Module):
    """A quantized frozen kernel in the place of ``Linear.kernel`` (an ``nnx.Param``).

    Holds ``codes`` and ``scales`` (:class:`QuantWeight`, shapes in :func:`quantize`)
    and mimics the parts of a Param that PEFT code reads: ``shape`` / ``ndim`` /
    ``size`` (of the dequantized kernel [*lead, in, out]), ``dtype`` (the model's
    parameter dtype, used when dequantizing outside a forward pass), ``kernel[...]``
    (the dequantized kernel) and ``get_metadata()["axes"]``. Inside a scan over stacked
    layers it holds one layer's slice, and ``shape`` follows the arrays.
    """

    def __init__(self, codes, scales, *, fmt: str, axes, dtype):
        self.codes = QuantWeight(codes, axes=tuple(axes))
        self.scales = QuantWeight(scales, axes=tuple(axes))
        self.fmt = check_format(fmt)
        self.axes = tuple(axes)
        self.dtype = jnp.dtype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return logical_shape(self.codes.shape, self.fmt)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes stored (codes + scales)."""
        return sum(int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize for v in self._vars())

    def _vars(self):
        return (self.codes, self.scales)

    def get_metadata(self) -> dict:
        return {"axes": self.axes}

    def dequantize(self, dtype=None) -> jax.Array:
        """The kernel [*lead, in, out] in ``dtype`` (default: the model's dtype)."""
        return dequantize(self.codes[...], self.scales[...], self.fmt, dtype or self.dtype)

    def __getitem__(self, index):
        return self.dequantize()[index]

    def matmul(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out] in x's dtype (see :func:`qmatmul`)."""
        return qmatmul(x, self.codes[...], self.scales[...], self.fmt)

    def set_value(self, value):
        raise ConfigError(
            "this kernel is quantized; dequantize the model first "
            "(jaxtune.quant.dequantize_model) to change or merge its weights"
        )

    @classmethod
    def from_param(cls, var: nnx.Variable, fmt: str) -> QuantizedKernel:
        """Quantizes a kernel Param [*lead, in, out] (host numpy, one layer at a time).

        Under ``nnx.eval_shape`` (abstract models) only the shapes are produced.
        """
        axes = tuple(var.get_metadata().get("axes") or (None,) * var.ndim)
        codes_shape, codes_dtype, scales_shape, scales_dtype = quantized_shapes(var.shape, fmt)
        value = var[...]
        if isinstance(value, jax.core.Tracer):
            codes = jnp.zeros(codes_shape, codes_dtype)
            scales = jnp.zeros(scales_shape, scales_dtype)
        else:
            codes = np.empty(codes_shape, codes_dtype)
            scales = np.empty(scales_shape, scales_dtype)
            lead = var.shape[:-2]
            for i in np.ndindex(*lead):  # one [in, out] slice on the host at a time
                codes[i], scales[i] = quantize(jax.device_get(value[i]), fmt)
            codes, scales = jnp.asarray(codes), jnp.asarray(scales)
        return cls(codes, scales, fmt=fmt, axes=axes, dtype=var.dtype)
