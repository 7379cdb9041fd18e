"""Class balance of classification data (``data.balance``) and the imbalance advice of
``jaxtune data inspect``.

``oversample`` and ``undersample`` change which examples the train split's rows are: the
tokenized cache is untouched (it holds each example once), and the split's row list is
replaced by a resampled list of example indices drawn from ``data.split_seed``. So the
cache, ``train.epochs`` (an epoch is the resampled rows), exact resume (the same seed
gives the same rows) and sweeps work unchanged. ``weight`` leaves the rows alone and
gives the loss inverse-frequency class weights (:func:`class_weights`). Validation and
test are never resampled or weighted: their metrics describe the data as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxtune.data.config import BALANCE, DataConfig
from jaxtune.errors import DataError

# A distinct random stream from the split and ``max_examples`` permutations (which use
# ``split_seed`` alone), so resampling does not correlate with which examples were kept.
_STREAM = 0xBA1
# ``data inspect`` flags a split whose largest class has this many times the examples
# of its smallest.
IMBALANCE_RATIO = 1.5
# Below this many minority examples, oversampling is suggested over weighting (a handful
# of examples with large weights makes the loss jumpy; copies spread them over batches).
FEW_EXAMPLES = 100
# From this many minority examples on, undersampling is also mentioned: enough is left
# to learn from, and epochs get shorter.
LARGE = 1000


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [K]: examples per class id (``-1`` labels are not counted)."""
    labels = np.asarray(labels)
    return np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.int64)


def balanced_examples(labels: np.ndarray, mode: str, seed: int) -> np.ndarray:
    """Example indices of a resampled train split (sorted, with repeats for copies).

    Args:
      labels: int [N] class ids of the split's examples.
      mode: ``oversample`` (every present class up to the largest class's count: all of
        its examples ``count // n_c`` times, plus a seeded ``count % n_c`` of them once
        more) or ``undersample`` (a seeded subset of each class down to the smallest
        present class's count).
      seed: ``data.split_seed``.

    Returns:
      int64 [M]; classes without examples stay without.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, _STREAM])
    present = [c for c in np.unique(labels) if c >= 0]
    members = {c: np.flatnonzero(labels == c) for c in present}
    sizes = [len(m) for m in members.values()]
    target = max(sizes) if mode == "oversample" else min(sizes)
    parts = []
    for c in present:
        idx = members[c]
        if mode == "oversample":
            whole, rest = divmod(target, len(idx))
            parts += [np.tile(idx, whole), rng.choice(idx, rest, replace=False)]
        else:
            parts.append(rng.choice(idx, target, replace=False))
    return np.sort(np.concatenate(parts)).astype(np.int64)


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """float64 [K]: ``n / (K' * n_c)`` per class (scikit-learn's ``balanced``).

    ``n`` is the number of labelled examples and ``K'`` the number of classes present, so
    the mean weight over the examples is 1. A class with no example weighs 0 (no example
    of it is ever weighted).
    """
    counts = class_counts(labels, num_classes)
    present = counts > 0
    w = np.zeros(num_classes, np.float64)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def class_weight_info(labels: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """What a ``data.balance: weight`` run keeps in its run directory
    (``class_weights.json``): ``{"balance", "label_names", "class_counts",
    "class_weights"}`` of the train split's labels (weights as :func:`class_weights`)."""
    counts = class_counts(labels, len(label_names))
    return {
        "balance": "weight",
        "label_names": list(label_names),
        "class_counts": counts.tolist(),
        "class_weights": class_weights(labels, len(label_names)).tolist(),
    }


def check_balance(cfg: DataConfig) -> None:
    """DataError unless ``data.balance`` is known and, if not ``none``, the data has
    class labels (checked before any split is read)."""
    if cfg.balance not in BALANCE:
        raise DataError(f"data.balance = {cfg.balance!r}; expected one of {', '.join(BALANCE)}")
    if cfg.balance != "none" and cfg.format != "classification":
        raise DataError(
            f"data.balance = {cfg.balance} needs class labels; expected data.format="
            f"classification (got {cfg.format}) or data.balance=none"
        )


def apply_balance(cfg: DataConfig, datasets: Mapping[str, Any]) -> None:
    """Resamples the train split's rows in place for ``oversample`` / ``undersample``.

    Records ``stats["balance"]`` (``{"mode", "before", "after"}``: counts per class
    name, and for ``weight`` ``"weights"`` per class name) on the train split.

    Raises:
      DataError: an unknown ``data.balance`` or one set for non-classification data.
    """
    check_balance(cfg)
    ds = datasets.get("train")
    if cfg.balance == "none" or ds is None:
        return
    names = ds.label_names
    before = class_counts(ds.labels, len(names))
    after = before
    if cfg.balance in ("oversample", "undersample"):
        rows = balanced_examples(ds.labels, cfg.balance, cfg.split_seed)
        ds.use_rows(rows, f"{cfg.balance}:{cfg.split_seed}")
        ds.stats["rows"] = len(rows)
        after = class_counts(ds.labels[rows], len(names))
    ds.stats["balance"] = {
        "mode": cfg.balance,
        "before": dict(zip(names, before.tolist(), strict=True)),
        "after": dict(zip(names, after.tolist(), strict=True)),
    }
    if cfg.balance == "weight":
        w = class_weights(ds.labels, len(names)).tolist()
        ds.stats["balance"]["weights"] = dict(zip(names, w, strict=True))


def balance_line(stats: Mapping[str, Any]) -> str | None:
    """One log line with the class counts before -> after ``data.balance`` (or None)."""
    b = stats.get("balance")
    if not b:
        return None
    if b["mode"] == "weight":
        parts = ", ".join(f"{k} {w:.3f} ({b['before'][k]})" for k, w in b["weights"].items())
        return f"data.balance=weight: loss weight per class (train examples) {parts}"
    counts = ", ".join(f"{k} {v} -> {b['after'][k]}" for k, v in b["before"].items())
    return f"data.balance={b['mode']}: train rows per class {counts}"


def imbalance_advice(split_counts: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """Whether a classification dataset is imbalanced, and which ``data.balance`` fits.

    Args:
      split_counts: ``{split: {class name: examples}}``, with ``train``.

    Returns:
      ``{"ratio", "imbalanced", "majority", "minority", "suggest", "reason",
      "warnings"}``: ``ratio`` = largest / smallest present train class;
      ``imbalanced`` = ``ratio >= IMBALANCE_RATIO``; ``suggest`` = ``oversample`` when
      the smallest class has fewer than ``FEW_EXAMPLES`` examples, else ``weight`` (and
      ``reason`` mentions ``undersample`` from ``LARGE`` minority examples on), None
      when balanced; ``warnings``: classes present in train but missing from another
      split.
    """
    train = {k: int(v) for k, v in split_counts["train"].items()}
    present = {k: v for k, v in train.items() if v > 0}
    majority = max(present, key=present.get)
    minority = min(present, key=present.get)
    ratio = present[majority] / present[minority]
    out: dict[str, Any] = {
        "ratio": ratio,
        "imbalanced": ratio >= IMBALANCE_RATIO,
        "majority": majority,
        "minority": minority,
        "suggest": None,
        "reason": None,
        "warnings": [],
    }
    small = present[minority]
    if out["imbalanced"]:
        head = f"{majority} has {ratio:.1f}x the examples of {minority} in train"
        if small < FEW_EXAMPLES:
            out["suggest"] = "oversample"
            out["reason"] = (
                f"{head}; {minority} has only {small} examples (< {FEW_EXAMPLES}): "
                "data.balance=oversample repeats them so every batch sees some "
                "(data.balance=weight is the alternative)"
            )
        else:
            out["suggest"] = "weight"
            out["reason"] = (
                f"{head}: data.balance=weight weighs the loss by inverse class frequency"
            )
            if small >= LARGE:
                out["reason"] += (
                    f"; with {small} {minority} examples, data.balance=undersample "
                    "(fewer, shorter epochs) is also reasonable"
                )
    for split, counts in split_counts.items():
        if split == "train":
            continue
        missing = [k for k in present if not counts.get(k)]
        if missing:
            out["warnings"].append(
                f"class(es) {', '.join(missing)} of train have no example in {split}: "
                "their recall there cannot be measured"
            )
    return out
