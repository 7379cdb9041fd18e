"""Rows from examples: best-fit packing, padded lengths, and collation into batch arrays.

A *row* is one line of a batch: one example (unpacked) or several (packed). Packing is
planned once from the example lengths (deterministic, no randomness), and the batch
iterator shuffles rows, not examples.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


def pack_lengths(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing bin packing of examples into rows of ``capacity`` tokens.

    Each example goes into the open row with the least free space that still fits it.
    Free space takes at most ``capacity + 1`` distinct values, so the search is a bisect
    over those values rather than over rows.

    Args:
      lengths: int [N] example lengths, each <= capacity.
      capacity: tokens per row (``seq_len``).

    Returns:
      ``(row_offsets int64 [R + 1], row_examples int64 [N])``: row ``r`` holds examples
      ``row_examples[row_offsets[r]:row_offsets[r + 1]]`` in increasing index order.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    free_values: list[int] = []  # sorted distinct free-space values that have open rows
    rows_by_free: dict[int, list[int]] = {}
    rows: list[list[int]] = []
    for ex in order.tolist():
        n = int(lengths[ex])
        k = bisect.bisect_left(free_values, n)
        if k < len(free_values):
            free = free_values[k]
            r = rows_by_free[free].pop()
            if not rows_by_free[free]:
                del rows_by_free[free]
                free_values.pop(k)
        else:
            r, free = len(rows), capacity
            rows.append([])
        rows[r].append(ex)
        left = free - n
        if left > 0:
            if left not in rows_by_free:
                rows_by_free[left] = []
                bisect.insort(free_values, left)
            rows_by_free[left].append(r)
    # Rows in order of their first example, examples in index order: readable and stable.
    rows = sorted((sorted(r) for r in rows), key=lambda r: r[0])
    row_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    row_offsets[1:] = np.cumsum([len(r) for r in rows])
    flat = [e for r in rows for e in r]
    return row_offsets, np.asarray(flat, dtype=np.int64)


def padded_length(n: int, multiple: int, buckets: Sequence[int] = ()) -> int:
    """Row length for a batch whose longest row has ``n`` tokens.

    The smallest bucket >= n when buckets are given, else n rounded up to ``multiple``;
    either way the train step sees a bounded set of shapes and compiles a bounded number
    of times.
    """
    for b in sorted(buckets):
        if b >= n:
            return int(b)
    m = max(int(multiple), 1)
    return max(-(-int(n) // m) * m, m)


def collate(ds, rows: Sequence[int], length: int) -> dict[str, np.ndarray]:
    """Batch arrays for rows of a :class:`~jaxtune.data.tokenized.TokenizedDataset`.

    Args:
      ds: the dataset.
      rows: row indices; ``-1`` gives an empty padding row (all masks 0, label -1), used
        to keep the batch shape for the last, partial batch.
      length: T, at least the longest row.

    Returns:
      ``input_ids``, ``targets``, ``attention_mask``, ``positions``, ``segment_ids``
      (int32 [B, T]), ``loss_weights`` (float32 [B, T]) and, for classification,
      ``labels`` (int32 [B]). See :mod:`jaxtune.data` for their meaning. A paired
      (preference) dataset gives each row two lines, chosen then rejected: arrays are
      [2B, T], pair ``k`` on lines ``2k`` and ``2k + 1`` (so a pair never straddles two
      devices' shards of the batch); with precomputed reference log-probabilities
      (``ds.ref_logps``, float [N]) also ``ref_logps`` float32 [2B] (0 on padding).
    """
    lines: list = []  # per batch line: the examples it holds (None = padding)
    for r in rows:
        examples = None if r < 0 else ds.row_examples[ds.row_offsets[r] : ds.row_offsets[r + 1]]
        if getattr(ds, "paired", False):
            lines += [None, None] if examples is None else [examples[:1], examples[1:]]
        else:
            lines.append(examples)
    b_size, t_len = len(lines), int(length)
    input_ids = np.full((b_size, t_len), ds.pad_id, dtype=np.int32)
    targets = np.full((b_size, t_len), ds.pad_id, dtype=np.int32)
    weights = np.zeros((b_size, t_len), dtype=np.float32)
    attention = np.zeros((b_size, t_len), dtype=np.int32)
    positions = np.zeros((b_size, t_len), dtype=np.int32)
    segments = np.zeros((b_size, t_len), dtype=np.int32)
    labels = np.full((b_size,), -1, dtype=np.int32) if ds.labels is not None else None
    ref = getattr(ds, "ref_logps", None)
    ref_logps = np.zeros((b_size,), dtype=np.float32) if ref is not None else None
    for b, examples in enumerate(lines):
        if examples is None:
            continue
        pos = 0
        for seg, ex in enumerate(examples, start=1):
            start, end = int(ds.offsets[ex]), int(ds.offsets[ex + 1])
            n = end - start
            if pos + n > t_len:
                raise ValueError(f"batch line {b} has more than {t_len} tokens")
            ids = ds.tokens[start:end]
            sl = slice(pos, pos + n)
            input_ids[b, sl] = ids
            # Targets shift within the example only, so no loss crosses a segment boundary
            # and the last token of an example is never trained (weight 0).
            targets[b, pos : pos + n - 1] = ids[1:]
            weights[b, pos : pos + n - 1] = ds.mask[start + 1 : end]
            attention[b, sl] = 1
            positions[b, sl] = np.arange(n, dtype=np.int32)
            segments[b, sl] = seg
            pos += n
        if labels is not None:
            labels[b] = ds.labels[examples[0]]
        if ref_logps is not None:
            ref_logps[b] = ref[examples[0]]
    batch = {
        "input_ids": input_ids,
        "targets": targets,
        "loss_weights": weights,
        "attention_mask": attention,
        "positions": positions,
        "segment_ids": segments,
    }
    if labels is not None:
        batch["labels"] = labels
    if ref_logps is not None:
        batch["ref_logps"] = ref_logps
    return batch
