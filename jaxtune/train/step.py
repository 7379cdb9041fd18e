"""The pure, jit-compiled training and evaluation steps.

The model is split once into ``graphdef`` (static), ``params`` (the trainable partition,
differentiated and updated) and ``frozen`` (everything else: never differentiated, never
donated, no optimizer state). Nothing is closed over inside jit: weights are arguments,
so XLA never constant-folds them.

Loss is the token-weighted mean cross-entropy over every trained token of the whole
optimizer step. With gradient accumulation the per-micro-batch *sums* are added and
divided once by the total trained-token count, so accumulation equals one big batch
(not a mean of means).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

MODEL_INPUTS = ("input_ids", "attention_mask", "positions", "segment_ids")


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


def label_loss_sums(model, batch: dict, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(sum of cross-entropy over labelled rows, number of such rows) for a classifier.

    batch: ``input_ids``/``attention_mask`` int32 [B, T] and ``labels`` int32 [B] (-1 =
    a padding row). Sums, like :func:`token_loss_sums`, so accumulation = one big batch.
    """
    logits = model(batch["input_ids"], batch["attention_mask"], rng=rng)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    labels = batch["labels"]
    valid = (labels >= 0).astype(jnp.float32)
    nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    return jnp.sum(nll * valid), jnp.sum(valid)


def loss_sums_for(model, loss_chunk: int | None = None) -> callable:
    """The loss of a model kind: labels for classifiers, next tokens for LMs.

    loss_chunk: ``model.loss_chunk`` for LMs (see :func:`token_loss_sums`).
    """
    import functools

    from jaxtune.models.heads import SequenceClassifier

    if isinstance(model, SequenceClassifier):
        return label_loss_sums
    return functools.partial(token_loss_sums, chunk=loss_chunk)


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    dropout: bool = False,
    loss_sums=token_loss_sums,
):
    """Builds ``train_step(state, frozen, batch) -> (state, metrics)``.

    Args:
      graphdef: from ``nnx.split(model, trainable_filter, ...)``.
      tx: optimizer over the trainable partition only.
      grad_accum: micro-batches per step; batch arrays are then [A, B, T].
      dropout: pass a per-step dropout key to the model.
      loss_sums: ``(model, micro_batch, rng) -> (loss sum, weight sum)``
        (:func:`token_loss_sums` or :func:`label_loss_sums`).

    ``state`` is ``{"step": int32 [], "params": State, "opt_state": ..., "seed": uint32 []}``.
    Per-step randomness is ``fold_in(key(seed), step)``: resuming at step k reproduces it.
    """

    def micro(params, frozen, mb, key):
        model = nnx.merge(graphdef, params, frozen)
        return loss_sums(model, mb, key)

    grad_fn = jax.value_and_grad(micro, has_aux=True)

    def train_step(state: dict[str, Any], frozen, batch: dict[str, jax.Array]):
        params = state["params"]
        key = jax.random.fold_in(jax.random.key(state["seed"]), state["step"]) if dropout else None
        if grad_accum == 1:
            (loss_sum, weight), grads = grad_fn(params, frozen, batch, key)
        else:

            def body(carry, xs):
                mb, i = xs
                k = None if key is None else jax.random.fold_in(key, i)
                (s, w), g = grad_fn(params, frozen, mb, k)
                acc_s, acc_w, acc_g = carry
                return (acc_s + s, acc_w + w, jax.tree.map(jnp.add, acc_g, g)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
            (loss_sum, weight, grads), _ = jax.lax.scan(body, init, (batch, jnp.arange(grad_accum)))
        denom = jnp.maximum(weight, 1.0)
        # Back to each parameter's dtype: dividing bf16 gradients by a float32 count
        # would silently promote them, and with them the optimizer moments.
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, params)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        # The state leaves keep their dtypes whatever the optimizer computes in: a
        # changed dtype would mean a second compilation (and more memory) next step.
        params = _same_dtypes(params, state["params"])
        opt_state = _same_dtypes(opt_state, state["opt_state"])
        new_state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        metrics = {
            "loss": loss,
            "tokens": weight,
            "grad_norm": grad_norm,
            # The host loop stops before saving a state whose loss, gradients or updated
            # weights are not finite, so every checkpoint on disk is a usable one.
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params),
        }
        return new_state, metrics

    return train_step


def _same_dtypes(new, old):
    return jax.tree.map(lambda n, o: n.astype(o.dtype) if n.dtype != o.dtype else n, new, old)


def all_finite(tree) -> jax.Array:
    """bool []: every element of every (floating) leaf is finite."""
    flags = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def make_eval_step(graphdef, *, loss_chunk: int | None = None):
    """``eval_step(params, frozen, batch) -> (loss_sum, weight_sum)`` (no dropout)."""

    def eval_step(params, frozen, batch):
        model = nnx.merge(graphdef, params, frozen)
        return token_loss_sums(model, batch, None, chunk=loss_chunk)

    return eval_step


def stack_micro_batches(batches: list[dict], pad_values: dict[str, int] | None = None) -> dict:
    """Stacks A host batches into [A, B, T] arrays, right-padding T to the longest."""
    import numpy as np

    t = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for k in batches[0]:
        arrs = []
        for b in batches:
            a = b[k]
            if a.ndim == 2 and a.shape[1] < t:
                a = np.pad(a, ((0, 0), (0, t - a.shape[1])))
            arrs.append(a)
        out[k] = np.stack(arrs)
    return out
