"""Error analysis over generated samples.

Summarises what a fine-tuned model actually writes, to spot the usual failure modes:

* **length**: characters / words / tokens per answer (mean, median, p90, max);
* **repetition**: repeated word n-gram rate (fraction of an answer's n-grams that already
  occurred earlier in the same answer; degenerate loops score near 1) and the share of
  answers above ``degenerate_threshold``;
* **empty** answers (only whitespace) and **truncated** ones (hit ``max_new_tokens``
  before an EOS or stop string);
* **exact match** against references where present, after SQuAD-style normalisation
  (lowercase, no punctuation or articles, collapsed whitespace), plus token-level F1.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, squeeze spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between normalised prediction and reference."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def repeated_ngram_rate(text: str, n: int = 3) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram of the same text (0 if < n words)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def _stats(values: Sequence[float]) -> dict:
    if not len(values):
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "min": 0.0, "max": 0.0}
    a = np.asarray(values, np.float64)
    return {
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def _references(ref) -> list[str]:
    if ref is None:
        return []
    return [str(r) for r in ref] if isinstance(ref, (list, tuple)) else [str(ref)]


def analyze_generations(
    texts: Sequence[str],
    *,
    references: Sequence | None = None,
    finish_reasons: Sequence[str] | None = None,
    token_counts: Sequence[int] | None = None,
    ngram: int = 3,
    degenerate_threshold: float = 0.5,
) -> dict:
    """Summary statistics and per-sample flags for N generated answers.

    Args:
      texts: N generated strings (after stop-string cutting).
      references: N references (a string, a list of acceptable strings, or None where a
        sample has none); exact match is computed over samples that have one.
      finish_reasons: N of ``eos`` / ``stop`` / ``length`` (from ``generate_ids``).
      token_counts: N generated token counts.
      ngram: n of the repeated n-gram rate.
      degenerate_threshold: repetition rate above which an answer counts as degenerate.

    Returns:
      ``{"summary": {...}, "samples": [N per-sample dicts]}``. The summary holds ``n``,
      ``chars`` / ``words`` / ``tokens`` length stats, ``repeated_ngram_rate`` (mean),
      ``degenerate_rate``, ``empty_rate``, ``truncated_rate`` and, with references,
      ``exact_match``, ``f1`` and ``n_with_reference``.
    """
    n = len(texts)
    refs = list(references) if references is not None else [None] * n
    reasons = list(finish_reasons) if finish_reasons is not None else [None] * n
    if len(refs) != n or len(reasons) != n:
        raise ValueError("references / finish_reasons must have one entry per text")
    samples, ems, f1s = [], [], []
    for i, text in enumerate(texts):
        rep = repeated_ngram_rate(text, ngram)
        s = {
            "index": i,
            "chars": len(text),
            "words": len(text.split()),
            "repeated_ngram_rate": rep,
            "degenerate": rep > degenerate_threshold,
            "empty": not text.strip(),
            "truncated": reasons[i] == "length",
            "finish_reason": reasons[i],
        }
        if token_counts is not None:
            s["tokens"] = int(token_counts[i])
        options = _references(refs[i])
        if options:
            s["exact_match"] = any(normalize_answer(text) == normalize_answer(r) for r in options)
            s["f1"] = max(token_f1(text, r) for r in options)
            ems.append(s["exact_match"])
            f1s.append(s["f1"])
        samples.append(s)
    summary = {
        "n": n,
        "chars": _stats([s["chars"] for s in samples]),
        "words": _stats([s["words"] for s in samples]),
        f"repeated_{ngram}gram_rate": float(np.mean([s["repeated_ngram_rate"] for s in samples]))
        if n
        else 0.0,
        "degenerate_rate": float(np.mean([s["degenerate"] for s in samples])) if n else 0.0,
        "empty_rate": float(np.mean([s["empty"] for s in samples])) if n else 0.0,
    }
    if token_counts is not None:
        summary["tokens"] = _stats([int(t) for t in token_counts])
    if finish_reasons is not None:
        summary["truncated_rate"] = float(np.mean([s["truncated"] for s in samples])) if n else 0.0
    if ems:
        summary["exact_match"] = float(np.mean(ems))
        summary["f1"] = float(np.mean(f1s))
        summary["n_with_reference"] = len(ems)
    return {"summary": summary, "samples": samples}


def flat_metrics(summary: dict) -> dict:
    """The scalar metrics of a summary, flattened for a report row (``chars_mean``...)."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            out[f"{k}_mean"] = v["mean"]
        else:
            out[k] = v
    return out


# Error-analysis categories of one answer, in the order they are checked (the first that
# applies wins): what a reviewer would file the answer under.
CATEGORIES = ("empty", "repetitive", "too long", "exact match", "partial", "wrong", "answered")


def error_category(sample: dict) -> str:
    """The category of one sample of :func:`analyze_generations`.

    ``empty``: only whitespace; ``repetitive``: degenerate n-gram loops; ``too long``: hit
    the token limit without ending; then, against a reference, ``exact match`` (SQuAD
    normalisation), ``partial`` (token F1 >= 0.5) or ``wrong``; ``answered`` without one.
    """
    if sample["empty"]:
        return "empty"
    if sample["degenerate"]:
        return "repetitive"
    if sample["truncated"]:
        return "too long"
    if "exact_match" not in sample:
        return "answered"
    if sample["exact_match"]:
        return "exact match"
    return "partial" if sample["f1"] >= 0.5 else "wrong"


def category_counts(samples: Sequence[dict]) -> dict[str, int]:
    """``{category: count}`` over samples, every category present, in :data:`CATEGORIES` order."""
    counts = Counter(error_category(s) for s in samples)
    return {c: counts.get(c, 0) for c in CATEGORIES}
