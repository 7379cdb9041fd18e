"""Export verification: fixed probe inputs and the one logits comparison every exporter uses.

An export is kept only if what was written, loaded back, gives the model's logits on
these probes within a tolerance that depends on the dtype; otherwise the exporter
raises :class:`~jaxtune.errors.ExportError` and removes what it wrote.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import ExportError


def numpy_logits(model, input_ids, attention_mask=None) -> np.ndarray:
    """Convenience for tests/scripts: jit-compiled forward, numpy float32 logits."""
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    return np.asarray(_forward(model, ids, mask))


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def probe_ids(vocab: int) -> np.ndarray:
    """Fixed probe batch int32 [2, 16] for export verification."""
    return np.random.RandomState(0).randint(0, min(vocab, 32000), (2, 16)).astype(np.int32)


def default_tolerance(dtype) -> tuple[float, float]:
    """(atol, rtol on max |logit|) for comparing a reloaded export with the model."""
    if jnp.dtype(dtype) == jnp.float32:
        return 1e-4, 1e-4
    # 16-bit weights: merging rounds W + s*A@B once more than the unmerged forward.
    return 1e-2, 2e-2


def probe_batch(vocab: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (ids, mask) int32 [2, 16]; row 1 right-padded with ``pad_id`` after 11 tokens.

    Real tokens avoid ``pad_id`` so HF's pad-id-based last-token search agrees.
    """
    ids = np.random.RandomState(0).randint(1, min(vocab, 32000), (2, 16)).astype(np.int32)
    ids[ids == pad_id] = 1 if pad_id != 1 else 2
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    ids[1, 11:] = pad_id
    return ids, mask


def param_dtype(model) -> jnp.dtype:
    """The dtype of the model's (first) parameter: what its exports are compared in."""
    return nnx.to_flat_state(nnx.state(model, nnx.Param))[0][1].dtype


def check_logits(model, reloaded, batches, tol, what: str, hint: str = "") -> float:
    """Max |logit difference| of ``reloaded`` vs ``model`` over probe batches; raises
    ExportError (naming ``what``) above ``atol + rtol * max |logit|``.

    Args:
      model / reloaded: callables ``(ids [B, T], mask [B, T] or None) -> logits``.
      batches: ``[(model's (ids, mask)), (reloaded's (ids, mask))]`` pairs: usually the
        same batch twice; an exported tokenizer may give the reloaded side its own.
      tol: ``(atol, rtol)``; None = :func:`default_tolerance` of the model's dtype.
    """
    atol, rtol = tol if tol is not None else default_tolerance(param_dtype(model))
    worst = 0.0
    for ours, theirs in batches:
        ref = numpy_logits(model, *ours)
        got = numpy_logits(reloaded, *theirs)
        diff = float(np.abs(ref - got).max())
        limit = atol + rtol * float(np.abs(ref).max())
        if not diff <= limit:  # also catches NaN
            raise ExportError(
                f"{what}: reloaded export differs from the model (max |logit diff| {diff:.3e} "
                f"> {limit:.1e}); nothing was written{hint}"
            )
        worst = max(worst, diff)
    return worst
