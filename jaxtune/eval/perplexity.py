"""Held-out loss and perplexity, token-weighted, batched and sharded like training.

The loss is the same function the trainer differentiates (``token_loss_sums``): the sum
of cross-entropies over trained tokens and their count are accumulated over every batch,
and divided once at the end, so the result is the mean over *tokens* (not a mean of
per-batch means) and does not depend on the batch size. Batches come from the same
:class:`~jaxtune.data.BatchIterator` (one epoch, in order, the last batch filled with
empty rows) and, given a mesh, are sharded over ``(data, fsdp)`` exactly as in training.
"""

from __future__ import annotations

import math
import time
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.data import BatchIterator, build_datasets
from jaxtune.errors import DataError
from jaxtune.models.losses import token_loss_sums
from jaxtune.sharding import device_batch

BATCH_KEYS = ("input_ids", "targets", "loss_weights", "attention_mask", "positions", "segment_ids")


@partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _loss_sums(graphdef, state, batch, chunk=None):
    return token_loss_sums(nnx.merge(graphdef, state), batch, None, chunk=chunk)


def evaluate_loss(
    model,
    dataset,
    *,
    batch_size: int = 8,
    mesh=None,
    max_batches: int | None = None,
    loss_chunk: int | None = None,
) -> dict:
    """Token-weighted loss and perplexity of a model on a tokenized split.

    The one held-out loss: ``jaxtune eval``'s ``perplexity`` task and the trainer's
    validation loss (``eval/loss``) both call it.

    Args:
      model: the model (when ``mesh`` is given, already placed on it, e.g. with
        ``jaxtune.sharding.shard_model``).
      dataset: a :class:`~jaxtune.data.TokenizedDataset` (``build_datasets(...)[split]``).
      batch_size: global rows per batch (divisible by the data-parallel size with a mesh).
      mesh: optional ``(data, fsdp, tensor)`` mesh: batches are sharded over its
        ``data`` and ``fsdp`` axes as in training; None runs on the default device.
      max_batches: stop after this many batches (None = the whole split).
      loss_chunk: cross-entropy chunking (``model.loss_chunk``; see ``token_loss_sums``).

    Returns:
      ``{"loss", "perplexity", "tokens", "batches", "seconds"}``; loss in nats per
      trained token.
    """

    it = BatchIterator.one_pass(dataset, batch_size, jax.process_index(), jax.process_count())
    graphdef, state = nnx.split(model)
    total, weight, n = 0.0, 0.0, 0
    t0 = time.perf_counter()
    for batch in it:
        if max_batches is not None and n >= max_batches:
            break
        batch = {k: batch[k] for k in BATCH_KEYS}
        if mesh is not None:
            arrays = device_batch(batch, mesh)
        else:
            arrays = {k: jnp.asarray(v) for k, v in batch.items()}
        s, w = _loss_sums(graphdef, state, arrays, loss_chunk)
        # Sums in float64 on the host: exact accumulation across many batches.
        total += float(s)
        weight += float(w)
        n += 1
    loss = total / weight if weight else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)) if weight else float("nan"),
        "tokens": int(weight),
        "batches": n,
        "seconds": time.perf_counter() - t0,
    }


def perplexity_of_data(
    model,
    tokenizer,
    data_cfg,
    *,
    split: str = "validation",
    seq_len: int = 512,
    batch_size: int = 8,
    mesh=None,
    max_batches: int | None = None,
) -> dict:
    """Loss and perplexity on one split described by a ``data`` config section.

    Args:
      data_cfg: :class:`~jaxtune.data.DataConfig` (any format: ``text`` scores every token,
        instruction/chat/completion score the responses, as training does).
      split: ``train``, ``validation`` or ``test``.
      seq_len: longest row (longer examples are truncated, text is chunked to it).

    Returns:
      As :func:`evaluate_loss`, plus ``split``.

    Raises:
      DataError: the split has no data, or its rows are malformed.
    """

    datasets = build_datasets(data_cfg, tokenizer, seq_len, splits=(split,))
    if split not in datasets:
        raise DataError(f"data.{split} has no data to evaluate on")
    out = evaluate_loss(
        model, datasets[split], batch_size=batch_size, mesh=mesh, max_batches=max_batches
    )
    return {**out, "split": split}
