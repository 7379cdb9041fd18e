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

from jaxtune.models.losses import token_loss_sums

MODEL_INPUTS = ("input_ids", "attention_mask", "positions", "segment_ids")


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
        (:func:`token_loss_sums` or :func:`label_loss_sums`), or ``(loss sum, weight
        sum, {name: metric sum})``: the task's metrics, accumulated like the loss and
        divided by the same total weight (``metrics["task"]``).

    ``state`` is ``{"step": int32 [], "params": State, "opt_state": ..., "seed": uint32 []}``.
    Per-step randomness is ``fold_in(key(seed), step)``: resuming at step k reproduces it.
    """

    def micro(params, frozen, mb, key):
        model = nnx.merge(graphdef, params, frozen)
        out = loss_sums(model, mb, key)
        return out[0], (out[1], out[2] if len(out) > 2 else {})

    grad_fn = jax.value_and_grad(micro, has_aux=True)

    def train_step(state: dict[str, Any], frozen, batch: dict[str, jax.Array]):
        params = state["params"]
        key = jax.random.fold_in(jax.random.key(state["seed"]), state["step"]) if dropout else None
        if grad_accum == 1:
            (loss_sum, (weight, task_sums)), grads = grad_fn(params, frozen, batch, key)
        else:

            def body(carry, xs):
                mb, i = xs
                k = None if key is None else jax.random.fold_in(key, i)
                (s, (w, m)), g = grad_fn(params, frozen, mb, k)
                acc_s, acc_w, acc_m, acc_g = carry
                acc_m = jax.tree.map(jnp.add, acc_m, m)
                return (acc_s + s, acc_w + w, acc_m, jax.tree.map(jnp.add, acc_g, g)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            first = jax.tree.map(lambda x: x[0], batch)
            # The task's metric sums: their structure, traced once, not computed.
            shapes = jax.eval_shape(micro, params, frozen, first, key)[1][1]
            m0 = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), m0, zeros)
            xs = (batch, jnp.arange(grad_accum))
            (loss_sum, weight, task_sums, grads), _ = jax.lax.scan(body, init, xs)
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
            "task": {k: v / denom for k, v in task_sums.items()},
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


def stack_micro_batches(batches: list[dict], pad_values: dict[str, int] | None = None) -> dict:
    """Stacks A host batches into [A, B, T] arrays, right-padding T to the longest."""

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
