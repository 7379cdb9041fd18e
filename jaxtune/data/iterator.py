"""Deterministic, sharded, resumable batches: :class:`BatchIterator`.

The order of an epoch is a pure function of ``(seed, epoch)``: a permutation of the rows
drawn from ``numpy.random.default_rng([seed, epoch])``. Batch ``k`` of an epoch is rows
``order[k * B:(k + 1) * B]`` of the global batch ``B``; host ``p`` of ``P`` takes the
``p``-th contiguous slice of ``B / P`` rows. So hosts never exchange data, their shards
are disjoint and together cover the epoch, and resuming at ``(epoch, step)`` computes
the remaining batches directly instead of replaying the skipped ones.

Every host also pads its rows to the same length T (from the longest row of the whole
*global* batch, which every host can compute since each holds the full row lengths), so
the per-host arrays assemble into one global array.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxtune.data.packing import collate
from jaxtune.data.tokenized import TokenizedDataset
from jaxtune.errors import DataError

STATE_VERSION = 1


class BatchIterator:
    """Iterates host-local batches of a :class:`TokenizedDataset`, epoch after epoch.

    Args:
      dataset: the split to iterate.
      batch_size: global batch size B (rows per step over all hosts); divisible by
        ``process_count``.
      seed: order seed (the run seed).
      epoch: epoch to start at.
      step: batch index within ``epoch`` to start at.
      shuffle: permute rows each epoch; False iterates in dataset order.
      drop_remainder: drop the last partial global batch of an epoch. When False it is
        filled with empty rows (all masks 0, ``labels`` -1) so shapes stay [B/P, T].
      process_index: this host's index (``jax.process_index()``).
      process_count: number of hosts (``jax.process_count()``).
      num_epochs: stop after this many epochs (counted from epoch 0); None = never stop.

    Yields:
      dicts of numpy arrays, each [B / P, T] (``labels`` [B / P]); see :mod:`jaxtune.data`.
      A paired (preference) dataset yields [2B / P, T]: B / P pairs, two lines each.
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        batch_size: int,
        seed: int = 0,
        *,
        epoch: int = 0,
        step: int = 0,
        shuffle: bool = True,
        drop_remainder: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        num_epochs: int | None = None,
    ):
        if batch_size <= 0 or batch_size % process_count:
            raise DataError(
                f"batch size {batch_size} must be positive and divisible by the number of "
                f"hosts ({process_count})"
            )
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} not in [0, {process_count})")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.num_epochs = num_epochs
        self.epoch = int(epoch)
        self.step = int(step)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"data.{dataset.split} has {len(dataset)} rows, fewer than one batch of "
                f"{batch_size}; lower the batch size or set drop_remainder=False"
            )
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    @classmethod
    def one_pass(
        cls,
        dataset: TokenizedDataset,
        batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> BatchIterator:
        """Every row once, in dataset order, the last batch partial: evaluation's pass."""
        return cls(
            dataset,
            batch_size,
            shuffle=False,
            drop_remainder=False,
            num_epochs=1,
            process_index=process_index,
            process_count=process_count,
        )

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """int64 [R]: the row order of an epoch (cached for the current one)."""
        if self._order_epoch != epoch:
            n = len(self.dataset)
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        return self._order

    def global_rows(self, epoch: int, step: int) -> np.ndarray:
        """int64 [B]: all hosts' rows of one batch, ``-1`` for padding rows."""
        rows = self.order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        if len(rows) < self.batch_size:
            rows = np.concatenate([rows, np.full(self.batch_size - len(rows), -1)])
        return rows

    def local_rows(self, epoch: int, step: int) -> np.ndarray:
        """int64 [B / P]: this host's rows of one batch."""
        k = self.local_batch_size
        return self.global_rows(epoch, step)[self.process_index * k : (self.process_index + 1) * k]

    def batch_length(self, rows: np.ndarray) -> int:
        """T for a global batch: its longest row, padded to a multiple or a bucket."""
        real = rows[rows >= 0]
        longest = int(self.dataset.row_lengths[real].max()) if len(real) else 1
        return self.dataset.padded_length(longest)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        rows = self.global_rows(self.epoch, self.step)
        length = self.batch_length(rows)
        k = self.local_batch_size
        local = rows[self.process_index * k : (self.process_index + 1) * k]
        self.step += 1
        return collate(self.dataset, local.tolist(), length)

    def state(self) -> dict[str, Any]:
        """Position of the next batch, as a small JSON-able dict for the checkpoint."""
        epoch, step = self.epoch, self.step
        if step >= self.steps_per_epoch:
            epoch, step = epoch + 1, 0
        return {
            "version": STATE_VERSION,
            "split": self.dataset.split,
            "fingerprint": self.dataset.fingerprint,
            "rows": len(self.dataset),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": epoch,
            "step": step,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continues from ``state()`` of an earlier iterator over the same data.

        The host count may differ from the run that saved the state (batches are defined
        globally); the data, batch size, seed and shuffle must match.

        Raises:
          DataError: the state belongs to different data or a different batch size.
        """
        expected = {
            "fingerprint": self.dataset.fingerprint,
            "rows": len(self.dataset),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }
        for key, value in expected.items():
            if state.get(key) != value:
                raise DataError(
                    f"data iterator state: {key} = {state.get(key)!r} in the checkpoint but "
                    f"{value!r} now; expected the same data, batch size and seed to resume"
                )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    @classmethod
    def from_state(
        cls, dataset: TokenizedDataset, state: dict[str, Any], **kwargs: Any
    ) -> BatchIterator:
        """A new iterator positioned at ``state`` (kwargs: process_index, ... as in init)."""
        it = cls(
            dataset,
            state["batch_size"],
            seed=state["seed"],
            shuffle=state["shuffle"],
            **kwargs,
        )
        it.restore(state)
        return it


def padding_fraction(iterator: BatchIterator, epoch: int = 0) -> float:
    """Fraction of padding positions over one epoch's batches (from lengths only)."""
    ds = iterator.dataset
    # A preference pair fills two batch lines (chosen, rejected) of its own lengths.
    paired = getattr(ds, "paired", False)
    lines, tokens = (2, ds.lengths.reshape(-1, 2).sum(1)) if paired else (1, ds.row_lengths)
    pad = total = 0
    for step in range(iterator.steps_per_epoch):
        rows = iterator.global_rows(epoch, step)
        length = iterator.batch_length(rows)
        real = rows[rows >= 0]
        total += lines * len(rows) * length
        pad += lines * len(rows) * length - int(tokens[real].sum())
    return pad / total if total else 0.0
