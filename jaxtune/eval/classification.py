"""Classification metrics from predicted class ids: accuracy, macro-F1, confusion matrix.

Works for any source of predictions: a classification head (argmax of its logits), a
generative model scored by label verbalizers (:func:`jaxtune.eval.scoring.
classify_by_verbalizer`), or multiple-choice argmaxes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxtune.errors import DataError


def classification_metrics(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows = gold, columns = predicted).

    Args:
      pred: int [N] predicted class ids in ``[0, num_classes)``.
      gold: int [N] gold class ids in ``[0, num_classes)``; ``-1`` rows (padding) are dropped.
      num_classes: K.

    Returns:
      ``{"accuracy", "macro_f1", "per_class_f1" [K], "confusion" [K][K], "n"}``. Macro-F1
      averages over every class (a class never gold nor predicted counts as F1 0).

    Raises:
      DataError: shapes differ or an id is outside ``[0, num_classes)``.
    """
    pred, gold = np.asarray(pred).reshape(-1), np.asarray(gold).reshape(-1)
    if pred.shape != gold.shape:
        raise DataError(f"{len(pred)} predictions for {len(gold)} gold labels")
    keep = gold >= 0
    pred, gold = pred[keep].astype(np.int64), gold[keep].astype(np.int64)
    for name, ids in (("predicted", pred), ("gold", gold)):
        bad = ids[(ids < 0) | (ids >= num_classes)]
        if len(bad):
            raise DataError(
                f"{name} class id {int(bad[0])} is out of range for {num_classes} classes "
                f"(expected 0..{num_classes - 1})"
            )
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (gold, pred), 1)
    f1s = []
    for c in range(num_classes):
        tp = cm[c, c]
        p = tp / max(cm[:, c].sum(), 1)
        r = tp / max(cm[c, :].sum(), 1)
        f1s.append(0.0 if p + r == 0 else float(2 * p * r / (p + r)))
    return {
        "accuracy": float((pred == gold).mean()) if len(gold) else 0.0,
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "per_class_f1": f1s,
        "confusion": cm.tolist(),
        "n": int(len(gold)),
    }


def classify_from_logits(logits: np.ndarray) -> np.ndarray:
    """Predicted ids from a classification head: float [N, K] -> int [N]."""
    return np.asarray(logits).argmax(axis=-1).astype(np.int64)


def classification_report(
    pred: np.ndarray, gold: np.ndarray, label_names: Sequence[str]
) -> tuple[dict, str]:
    """Metrics plus a Markdown summary with the confusion matrix.

    Args:
      pred: int [N] predicted ids (e.g. a head's argmax, see :func:`classify_from_logits`).
      gold: int [N] gold ids.
      label_names: K class names in id order.

    Returns:
      (metrics dict as :func:`classification_metrics`, Markdown text).
    """
    names = list(label_names)
    m = classification_metrics(pred, gold, len(names))
    lines = [
        f"accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}, n = {m['n']}",
        "",
        "| gold \\ predicted | " + " | ".join(names) + " | F1 |",
        "|---" * (len(names) + 2) + "|",
    ]
    for name, row, f1 in zip(names, m["confusion"], m["per_class_f1"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + f" | {f1:.3f} |")
    return m, "\n".join(lines) + "\n"
