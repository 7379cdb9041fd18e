"""Losses shared by training and evaluation: token cross-entropy (chunked over the
sequence when the logits would be large), per-sequence sums of it (the log-probabilities
preference losses compare) and label cross-entropy for classifiers.

Every loss returns *sums* (loss sum, weight sum) for one micro-batch, so gradient
accumulation and multi-batch evaluation divide once by the total weight (one big
batch, not a mean of means).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Float32 logits of a micro-batch above this size are computed in chunks (auto mode).
_LOGITS_BYTES_UNCHUNKED = 1 << 30


def token_loss_sums(
    model, batch: dict, rng: jax.Array | None, *, chunk: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token cross-entropy, sum of weights) for one micro-batch.

    batch: ``input_ids``/``targets``/``attention_mask``/``positions``/``segment_ids`` int32
    [B, T] and ``loss_weights`` float32 [B, T].

    chunk: sequence positions per cross-entropy chunk (see :func:`loss_chunk_for`): the
    [B, chunk, V] logits are made, reduced and (in the backward pass) remade one chunk
    at a time, so the [B, T, V] logits never exist; None = auto, 0 = never chunk.
    """
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"], rng=rng)
    targets = batch["targets"]
    w = batch["loss_weights"].astype(jnp.float32)
    b, t = targets.shape
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    c = loss_chunk_for(b, t, vocab, chunk) if hasattr(model, "logits_from_hidden") else t
    if c >= t:
        logits = model(batch["input_ids"], batch["attention_mask"], **kw)
        nll = token_cross_entropy(logits.astype(jnp.float32), targets)
        return jnp.sum(nll * w), jnp.sum(w)
    h = model.hidden_states(batch["input_ids"], batch["attention_mask"], **kw)  # [B, T, D]
    return jnp.sum(chunked_token_nll(model, h, targets, w, c)), jnp.sum(w)


def loss_chunk_for(batch: int, seq: int, vocab: int | None, chunk: int | None) -> int:
    """Positions per cross-entropy chunk; ``seq`` (or more) means one piece.

    None (auto) chunks only when the [B, T, V] float32 logits would exceed 1 GiB, in
    power-of-two chunks of at most 256 MiB of logits (>= 16 positions).
    """
    if chunk == 0 or not vocab:
        return seq
    if chunk is None:
        if batch * seq * vocab * 4 <= _LOGITS_BYTES_UNCHUNKED:
            return seq
        fit = max(16, (_LOGITS_BYTES_UNCHUNKED // 4) // (batch * vocab * 4))
        chunk = 1 << (fit.bit_length() - 1)
    return min(int(chunk), seq)


def chunked_token_nll(model, h: jax.Array, targets: jax.Array, w: jax.Array, chunk: int):
    """Weighted token NLL summed per chunk: h [B, T, D], targets/w [B, T] -> [n_chunks].

    A ``lax.scan`` over sequence chunks; each chunk's logits are rematerialised in the
    backward pass (``jax.checkpoint``), so peak memory holds one [B, chunk, V] piece.
    """
    b, t, d = h.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:  # padded positions carry weight 0
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        w = jnp.pad(w, ((0, 0), (0, pad)))
    graphdef, state = nnx.split(model)

    @jax.checkpoint
    def piece(state, hc, tc, wc):
        logits = nnx.merge(graphdef, state).logits_from_hidden(hc)  # [B, c, V] float32
        return jnp.sum(token_cross_entropy(logits.astype(jnp.float32), tc) * wc)

    def body(_, xs):
        return None, piece(state, *xs)

    xs = (
        h.reshape(b, n, chunk, d).swapaxes(0, 1),
        targets.reshape(b, n, chunk).swapaxes(0, 1),
        w.reshape(b, n, chunk).swapaxes(0, 1),
    )
    return jax.lax.scan(body, None, xs)[1]


def row_nll_sums(
    model, batch: dict, rng: jax.Array | None, weights: jax.Array, *, chunk: int | None = None
) -> jax.Array:
    """Per-row weighted sums of token cross-entropy, for K weightings of the same tokens.

    batch: as :func:`token_loss_sums` ([N, T] arrays); weights: float32 [K, N, T].
    Returns float32 [K, N]: ``sum_t nll[n, t] * weights[k, n, t]``. Preference losses
    read sequence log-probabilities from it (``-row_nll_sums``); one forward pass serves
    every weighting. ``chunk`` as in :func:`token_loss_sums`.
    """
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"], rng=rng)
    targets = batch["targets"]
    weights = weights.astype(jnp.float32)
    b, t = targets.shape
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    c = loss_chunk_for(b, t, vocab, chunk) if hasattr(model, "logits_from_hidden") else t
    if c >= t:
        logits = model(batch["input_ids"], batch["attention_mask"], **kw)
        nll = token_cross_entropy(logits.astype(jnp.float32), targets)  # [N, T]
        return jnp.sum(nll[None] * weights, axis=-1)
    h = model.hidden_states(batch["input_ids"], batch["attention_mask"], **kw)  # [N, T, D]
    n = -(-t // c)
    pad = n * c - t
    if pad:  # padded positions carry weight 0
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, 0), (0, pad)))
    graphdef, state = nnx.split(model)

    @jax.checkpoint
    def piece(state, hc, tc, wc):  # [N, c, D], [N, c], [K, N, c] -> [K, N]
        logits = nnx.merge(graphdef, state).logits_from_hidden(hc)
        nll = token_cross_entropy(logits.astype(jnp.float32), tc)
        return jnp.sum(nll[None] * wc, axis=-1)

    def body(acc, xs):
        return acc + piece(state, *xs), None

    xs = (
        h.reshape(b, n, c, -1).swapaxes(0, 1),
        targets.reshape(b, n, c).swapaxes(0, 1),
        weights.reshape(weights.shape[0], b, n, c).transpose(2, 0, 1, 3),
    )
    init = jnp.zeros(weights.shape[:2], jnp.float32)
    return jax.lax.scan(body, init, xs)[0]


@jax.custom_vjp
def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token ``-log softmax(logits)[target]``: float [..., V], int [...] -> [...].

    The backward pass is written out as ``(softmax - onehot) * g``, one fused pass
    over the [..., V] logits. Autodiff through ``log_softmax`` + ``take_along_axis``
    instead keeps the log-probabilities alive and adds a scatter and transposed copies:
    measured on CPU, the step takes 5-10% longer and ~130 MiB more (vocab 8192,
    2048 tokens).
    """
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _xent_fwd(logits, targets):
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return nll, (logits, lse, targets)


def _xent_bwd(res, g):
    logits, lse, targets = res
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    onehot = (vocab == targets[..., None]).astype(logits.dtype)
    dlogits = (jnp.exp(logits - lse[..., None]) - onehot) * g[..., None]
    # Integer targets have no gradient: their cotangent is float0 zeros.
    return dlogits, np.zeros(targets.shape, jax.dtypes.float0)


token_cross_entropy.defvjp(_xent_fwd, _xent_bwd)


def label_loss_sums(
    model, batch: dict, rng: jax.Array | None, class_weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(sum of cross-entropy over labelled rows, their weight) for a classifier.

    batch: ``input_ids``/``attention_mask`` int32 [B, T] and ``labels`` int32 [B] (-1 =
    a padding row). Sums, like :func:`token_loss_sums`, so accumulation = one big batch.

    class_weights: float32 [K] or None. With weights (``data.balance: weight``) the
    sums are ``(sum_i w[y_i] * CE_i, sum_i w[y_i])``, so the step's loss is the
    class-weighted mean over the whole accumulated batch; None weighs every row 1.
    """
    logits = model(batch["input_ids"], batch["attention_mask"], rng=rng)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    labels = batch["labels"]
    valid = (labels >= 0).astype(jnp.float32)
    safe = jnp.maximum(labels, 0)
    if class_weights is not None:
        valid = valid * jnp.asarray(class_weights, jnp.float32)[safe]
    nll = -jnp.take_along_axis(logp, safe[:, None], axis=-1)[:, 0]
    return jnp.sum(nll * valid), jnp.sum(valid)
