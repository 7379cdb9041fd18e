"""Multiple-choice accuracy by log-likelihood, with lm-evaluation-harness conventions.

For each item the model scores every continuation given the context (summed log-prob of
its tokens, see :mod:`jaxtune.eval.scoring`):

* ``acc``: the gold continuation has the highest summed log-prob;
* ``acc_norm``: the highest log-prob divided by the continuation's length in characters
  (the harness's length normalisation; prefers long answers less than ``acc`` does);
* ``acc_stderr``: sample standard error of ``acc`` (``sqrt(acc (1 - acc) / (n - 1))``).

Ties go to the lowest index (``argmax``), as in the harness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from jaxtune.eval.scoring import ChoiceScores, score_choices
from jaxtune.eval.tasks import MCItem


def predictions(items: Sequence[MCItem], scores: Sequence[ChoiceScores]) -> list[dict]:
    """Per-item records: gold, ``pred`` (acc), ``pred_norm`` (acc_norm) and the log-probs."""
    out = []
    for it, s in zip(items, scores, strict=True):
        lengths = np.maximum(np.asarray(it.lengths, np.float64), 1.0)
        out.append(
            {
                "label": it.label,
                "pred": int(np.argmax(s.logprob)),
                "pred_norm": int(np.argmax(s.logprob / lengths)),
                "logprob": [round(float(x), 6) for x in s.logprob],
                "tokens": [int(x) for x in s.tokens],
                "group": it.group,
            }
        )
    return out


def accuracy_metrics(preds: Sequence[dict]) -> dict:
    """``{"acc", "acc_norm", "acc_stderr", "n"}`` over per-item records."""
    n = len(preds)
    if n == 0:
        return {"acc": float("nan"), "acc_norm": float("nan"), "acc_stderr": float("nan"), "n": 0}
    acc = float(np.mean([p["pred"] == p["label"] for p in preds]))
    acc_norm = float(np.mean([p["pred_norm"] == p["label"] for p in preds]))
    stderr = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else float("nan")
    return {"acc": acc, "acc_norm": acc_norm, "acc_stderr": stderr, "n": n}


def grouped_metrics(name: str, preds: Sequence[dict]) -> dict[str, dict]:
    """Metrics per group (``{name}_{group}``) and their macro average under ``name``.

    The macro average (``acc``, ``acc_norm``) weighs every group equally, the usual way
    MMLU is reported; ``acc_micro`` weighs every item equally.
    """
    groups: dict[str, list[dict]] = {}
    for p in preds:
        groups.setdefault(p["group"], []).append(p)
    out = {f"{name}_{g}": accuracy_metrics(ps) for g, ps in sorted(groups.items())}
    micro = accuracy_metrics(preds)
    out[name] = {
        "acc": float(np.mean([m["acc"] for m in out.values()])),
        "acc_norm": float(np.mean([m["acc_norm"] for m in out.values()])),
        "acc_micro": micro["acc"],
        "n": micro["n"],
        "groups": len(groups),
    }
    return out


def evaluate_items(
    model,
    tokenizer,
    items: Sequence[MCItem],
    *,
    batch_size: int = 32,
    max_len: int = 2048,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict, list[dict]]:
    """Scores items and computes ``acc`` / ``acc_norm``.

    Args:
      items: N multiple-choice items.
      batch_size: (item, choice) rows per forward pass.
      max_len: token budget of context + continuation (left truncation beyond it).

    Returns:
      (metrics ``{"acc", "acc_norm", "acc_stderr", "n"}``, N per-item prediction records).
    """
    scores = score_choices(
        model,
        tokenizer,
        [(it.context, it.choices) for it in items],
        batch_size=batch_size,
        max_len=max_len,
        progress=progress,
    )
    preds = predictions(items, scores)
    return accuracy_metrics(preds), preds
