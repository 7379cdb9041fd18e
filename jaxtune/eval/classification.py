"""Classification metrics from predicted class ids: accuracy, macro-F1, confusion matrix.

Works for any source of predictions: a classification head (argmax of its logits), a
generative model scored by label verbalizers (:func:`jaxtune.eval.scoring.
classify_by_verbalizer`), or multiple-choice argmaxes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.data import BatchIterator
from jaxtune.errors import DataError


def classification_metrics(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows = gold, columns = predicted).

    Args:
      pred: int [N] predicted class ids in ``[0, num_classes)``.
      gold: int [N] gold class ids in ``[0, num_classes)``; ``-1`` rows (padding) are dropped.
      num_classes: K.

    Returns:
      ``{"accuracy", "macro_f1", "per_class_precision" [K], "per_class_recall" [K],
      "per_class_f1" [K], "support" [K], "confusion" [K][K], "n"}`` (see
      :func:`per_class`). Macro-F1 averages over every class (a class never gold nor
      predicted counts as F1 0).

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
    per = per_class(cm)
    return {
        "accuracy": float((pred == gold).mean()) if len(gold) else 0.0,
        "macro_f1": float(np.mean(per["per_class_f1"])) if num_classes else 0.0,
        **per,
        "confusion": cm.tolist(),
        "n": int(len(gold)),
    }


def per_class(confusion) -> dict:
    """Per-class numbers of a confusion matrix (rows = gold, columns = predicted).

    Args:
      confusion: int [K, K].

    Returns:
      ``{"per_class_precision", "per_class_recall", "per_class_f1", "support"}``, each a
      list of K (support: gold examples per class). A class never predicted has
      precision 0, one never gold recall 0 (and F1 0 when both are 0).
    """
    cm = np.asarray(confusion, np.int64)
    tp = np.diag(cm).astype(np.float64)
    precision = tp / np.maximum(cm.sum(0), 1)
    recall = tp / np.maximum(cm.sum(1), 1)
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    return {
        "per_class_precision": precision.tolist(),
        "per_class_recall": recall.tolist(),
        "per_class_f1": f1.tolist(),
        "support": cm.sum(1).astype(int).tolist(),
    }


def per_class_markdown(metrics: dict, label_names: Sequence[str] | None = None) -> list[str]:
    """Markdown lines of the per-class table: class, support, precision, recall, F1.

    Args:
      metrics: a dict with :func:`per_class`'s keys.
      label_names: K class names in id order; None = the ids.
    """
    k = len(metrics["support"])
    names = list(label_names) if label_names else [str(i) for i in range(k)]
    lines = ["| class | support | precision | recall | F1 |", "|---|---|---|---|---|"]
    for i, name in enumerate(names):
        lines.append(
            f"| {name} | {metrics['support'][i]} | {metrics['per_class_precision'][i]:.4f} | "
            f"{metrics['per_class_recall'][i]:.4f} | {metrics['per_class_f1'][i]:.4f} |"
        )
    return lines


def classify_from_logits(logits: np.ndarray) -> np.ndarray:
    """Predicted ids from a classification head: float [N, K] -> int [N]."""
    return np.asarray(logits).argmax(axis=-1).astype(np.int64)


def classification_report(
    pred: np.ndarray, gold: np.ndarray, label_names: Sequence[str]
) -> tuple[dict, str]:
    """Metrics plus a Markdown summary: the confusion matrix and the per-class table.

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
    lines += ["", *per_class_markdown(m, names)]
    return m, "\n".join(lines) + "\n"


@nnx.jit
def _logits(clf, ids, mask):
    return clf(ids, mask)


def predict(
    clf, dataset, batch_size: int = 32, max_batches: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(logits float32 [N, K], gold labels int [N]) over a split, in dataset order.

    The one prediction loop of sequence classifiers (training's held-out metrics, its
    final report, ``jaxtune eval`` and the method comparison all use it). ``max_batches``
    caps the batches (``train.max_eval_batches``); None = the whole split.
    """
    it = BatchIterator(dataset, batch_size, shuffle=False, drop_remainder=False, num_epochs=1)
    logits, gold = [], []
    for i, batch in enumerate(it):
        if max_batches and i >= max_batches:
            break
        keep = batch["labels"] >= 0
        out = np.asarray(_logits(clf, batch["input_ids"], batch["attention_mask"]))
        logits.append(out[keep])
        gold.append(batch["labels"][keep])
    return np.concatenate(logits), np.concatenate(gold)


def classifier_metrics(clf, dataset, batch_size: int, max_batches: int | None = None) -> dict:
    """Held-out loss, accuracy and macro-F1 of a sequence classifier.

    Args:
      clf: the classifier (``logits [B, K] = clf(ids [B, T], mask [B, T])``).
      dataset: a classification ``TokenizedDataset`` (``labels`` int [N]).
      batch_size: rows per forward pass.
      max_batches: cap on batches (``train.max_eval_batches``); None = the whole split.

    Returns:
      ``{"eval/loss", "eval/accuracy", "eval/macro_f1", "eval/n"}`` plus, under
      ``"confusion"``, the [K, K] confusion matrix (rows = gold).
    """
    logits, gold = predict(clf, dataset, batch_size, max_batches)
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    loss = float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(gold)[:, None], axis=-1)))
    m = classification_metrics(logits.argmax(-1), gold, logits.shape[-1])
    return {
        "eval/loss": loss,
        "eval/accuracy": float(m["accuracy"]),
        "eval/macro_f1": float(m["macro_f1"]),
        "eval/n": int(m["n"]),
        "confusion": m["confusion"],
    }
