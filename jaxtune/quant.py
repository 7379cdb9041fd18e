"""Quantizing a model: which kernels become :class:`~jaxtune.models.quantized.QuantizedKernel`.

The storage format, the quantizer and the fused dequantizing matmul are
:mod:`jaxtune.models.quantized` (layer 1, used by ``Linear``); this module (layer 2,
a model transform beside PEFT) swaps a model's kernels in and out of that form.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import ConfigError
from jaxtune.models import family_of_config
from jaxtune.models.layers import Linear
from jaxtune.models.quantized import QuantizedKernel, check_format


def targets(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """The ``Linear`` modules whose kernels are quantized: those inside ``layers``.

    Same set as PEFT's ``all-linear``: LM heads and classification heads stay dense.
    """
    return [
        (tuple(p), m)
        for p, m in nnx.iter_modules(model)
        if isinstance(m, Linear) and "layers" in tuple(p)
    ]


def quantize_model(model: nnx.Module, fmt: str | None) -> nnx.Module:
    """Replaces the kernels of :func:`targets` by :class:`QuantizedKernel` (in place).

    ``fmt=None`` returns the model unchanged. Works on concrete models (quantized on the
    host) and inside ``nnx.eval_shape`` (abstract shapes, e.g. for ``jaxtune plan``).
    """
    if fmt is None:
        return model
    check_format(fmt)
    found = targets(model)
    if not found:
        raise ConfigError("model.quantize: the model has no linear layers to quantize")
    for _, lin in found:
        if isinstance(lin.kernel, QuantizedKernel):
            if lin.kernel.fmt != fmt:
                raise ConfigError(f"model.quantize={fmt}: already quantized as {lin.kernel.fmt}")
            continue
        lin.kernel = QuantizedKernel.from_param(lin.kernel, fmt)
    return model


def quant_format(model: nnx.Module) -> str | None:
    """``int8`` / ``nf4`` if the model has quantized kernels, else None."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, QuantizedKernel):
            return m.fmt
    return None


def dequantize_model(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with dense ``nnx.Param`` kernels (``model`` is untouched).

    The kernels get the model's parameter dtype and keep their axes; LoRA factors stay
    unmerged (``jaxtune.peft.merge`` can then fold them in, as PEFT does for bnb models).
    """
    if quant_format(model) is None:
        return model
    new = nnx.clone(model)
    for _, lin in nnx.iter_modules(new):
        if isinstance(lin, Linear) and isinstance(lin.kernel, QuantizedKernel):
            q = lin.kernel
            lin.kernel = nnx.Param(q.dequantize(), axes=q.axes)
    return new


def abstract_quantized_model(cfg, dtype=jnp.float32, fmt: str | None = None) -> nnx.Module:
    """Like ``jaxtune.models.abstract_model``, with quantized kernels if ``fmt``."""
    cls = family_of_config(cfg).model_class()
    return nnx.eval_shape(lambda: quantize_model(cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)), fmt))


def quantized_stats(model: nnx.Module) -> dict:
    """``{"params": logical weights quantized, "bytes": bytes stored}`` (zeros if none)."""
    kernels = [m for _, m in nnx.iter_modules(model) if isinstance(m, QuantizedKernel)]
    return {"params": sum(k.size for k in kernels), "bytes": sum(k.nbytes for k in kernels)}
