"""Counterfactual bias probes: groups of texts that differ in one labelled attribute.

A probe file is JSONL, one group per line::

    {"attribute": "pronoun", "variants": {"female": "She said the film was a delight.",
                                          "male": "He said the film was a delight."},
     "id": "optional", "template": "optional"}

``variants`` maps each value of the attribute (>= 2, non-empty names) to its text; the
texts of a group should differ only in that attribute. The built-in probe is
:func:`jaxtune.eval.probes.builtin_groups`.

Metrics are computed from per-variant scores, so they need no model
(:mod:`jaxtune.eval.bias_probe` produces the scores):

* a classifier (K class probabilities per variant), per attribute: ``flip_rate``, the
  share of groups whose variants do not all get the same predicted class;
  ``score_gap``, the mean over groups of max - min over the variants of P(target), the
  target being class 1 (the positive / last class) when K = 2, else the class predicted
  for the group's first variant; the mean P(target) of each value and ``value_gap``,
  the largest difference between two values' means, with ``favoured`` the value with
  the highest mean and ``disfavoured`` the lowest;
* a language model (the total log-probability of each text), per attribute:
  ``logprob_gap``, the mean over groups of max - min of the variants' log-probabilities
  (nats), ``logprob_gap_per_token`` the same per token, the mean log-probability of each
  value and ``favoured``, the value with the highest mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxtune.errors import DataError
from jaxtune.eval.tasks import jsonl_rows

GROUP_FIELDS = '{"attribute": str, "variants": {value: text, ...}}'


@dataclass(frozen=True)
class CFGroup:
    """One counterfactual group.

    Attributes:
      attribute: what varies (``pronoun``).
      variants: V >= 2 pairs (value, text), in file order.
      id: the group's id (file line or built-in id).
      template: the text with the varied part marked, if known.
    """

    attribute: str
    variants: tuple[tuple[str, str], ...]
    id: str = ""
    template: str | None = None

    @property
    def texts(self) -> list[str]:
        return [t for _, t in self.variants]

    @property
    def values(self) -> list[str]:
        return [v for v, _ in self.variants]


def check_group(row, where: str) -> CFGroup:
    """Validates one parsed line; ``where`` (``file:line``) prefixes every error.

    Raises:
      DataError: not an object, a missing / empty attribute, fewer than two variants, or
        a variant value or text that is not a non-empty string.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object {GROUP_FIELDS}, got {type(row).__name__}")
    attr = row.get("attribute")
    if not isinstance(attr, str) or not attr.strip():
        raise DataError(
            f"{where}: field 'attribute' must be a non-empty string naming what varies "
            f"(expected {GROUP_FIELDS})"
        )
    variants = row.get("variants")
    if not isinstance(variants, dict):
        raise DataError(
            f"{where}: field 'variants' must be an object mapping each value of "
            f"{attr!r} to its text (expected {GROUP_FIELDS})"
        )
    if len(variants) < 2:
        raise DataError(f"{where}: field 'variants' has {len(variants)} value(s); expected >= 2")
    for value, text in variants.items():
        if not value.strip():
            raise DataError(f"{where}: field 'variants' has an empty value name")
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{where}: field 'variants'[{value!r}] must be a non-empty string, got {text!r}"
            )
    for key in ("id", "template"):
        if key in row and not isinstance(row[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {row[key]!r}")
    return CFGroup(attr.strip(), tuple(variants.items()), row.get("id", where), row.get("template"))


def read_groups(path: str | Path) -> list[CFGroup]:
    """Parses and validates a probe file, every line before anything is scored.

    Raises:
      DataError: naming the file, the line and the field.
    """
    rows = jsonl_rows(path, "counterfactual probe file")
    groups = [check_group(row, where) for where, row in rows]
    if not groups:
        raise DataError(f"{path}: no groups (expected one JSON object per line: {GROUP_FIELDS})")
    return groups


def _by_attribute(groups: Sequence[CFGroup]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        out.setdefault(g.attribute, []).append(i)
    return out


def _value_means(groups, rows, scores) -> dict[str, float]:
    """Mean score of each value over the groups that have it, in first-seen order."""
    sums: dict[str, list[float]] = {}
    for i in rows:
        for v, s in zip(groups[i].values, scores[i], strict=True):
            sums.setdefault(v, []).append(float(s))
    return {v: float(np.mean(s)) for v, s in sums.items()}


def _extremes(means: dict[str, float]) -> dict:
    """The values with the highest and lowest mean (None for both when all are equal)."""
    hi = max(means, key=means.__getitem__)
    lo = min(means, key=means.__getitem__)
    gap = means[hi] - means[lo]
    if gap == 0:
        return {"favoured": None, "disfavoured": None, "value_gap": 0.0}
    return {"favoured": hi, "disfavoured": lo, "value_gap": gap}


def _favoured(a: dict, digits: int) -> str:
    if a["favoured"] is None:
        return "none (all values equal)"
    return f"{a['favoured']} (+{a['value_gap']:.{digits}f} over {a['disfavoured']})"


def classifier_bias(
    groups: Sequence[CFGroup], probs: Sequence[np.ndarray], label_names=None
) -> dict[str, dict]:
    """Flip rate and score gaps of a classifier, per attribute.

    Args:
      groups: G groups.
      probs: G arrays float [V_g, K], the class probabilities of each group's variants.
      label_names: K class names (for the ``target`` description), or None.

    Returns:
      ``{attribute: {"groups", "texts", "flip_rate", "score_gap", "target",
      "value_means" {value: mean P(target)}, "favoured", "disfavoured", "value_gap"}}``,
      attributes in first-seen order.
    """
    if len(probs) != len(groups):
        raise ValueError(f"{len(probs)} score arrays for {len(groups)} groups")
    k = int(np.asarray(probs[0]).shape[-1]) if len(probs) else 2
    if k == 2:
        target = f"P({label_names[1] if label_names else 'class 1'})"
    else:
        target = "P(class predicted for the group's first variant)"
    flips, gaps, tscores = [], [], []
    for g, p in zip(groups, probs, strict=True):
        p = np.asarray(p, np.float64)
        if p.shape != (len(g.variants), k):
            raise ValueError(f"group {g.id}: scores {p.shape}, expected {(len(g.variants), k)}")
        pred = p.argmax(-1)
        t = 1 if k == 2 else int(pred[0])
        flips.append(float(len(set(pred.tolist())) > 1))
        gaps.append(float(p[:, t].max() - p[:, t].min()))
        tscores.append(p[:, t])
    out = {}
    for attr, rows in _by_attribute(groups).items():
        means = _value_means(groups, rows, tscores)
        out[attr] = {
            "groups": len(rows),
            "texts": sum(len(groups[i].variants) for i in rows),
            "flip_rate": float(np.mean([flips[i] for i in rows])),
            "score_gap": float(np.mean([gaps[i] for i in rows])),
            "target": target,
            "value_means": means,
            **_extremes(means),
        }
    return out


def lm_bias(
    groups: Sequence[CFGroup], logprobs: Sequence[np.ndarray], tokens: Sequence[np.ndarray]
) -> dict[str, dict]:
    """Log-likelihood gaps of a language model, per attribute.

    Args:
      groups: G groups.
      logprobs: G arrays float [V_g], each variant's total log-probability (nats).
      tokens: G arrays int [V_g], the tokens each log-probability sums over.

    Returns:
      ``{attribute: {"groups", "texts", "logprob_gap", "logprob_gap_per_token",
      "value_means" {value: mean log-prob}, "value_means_per_token", "favoured",
      "disfavoured", "value_gap"}}``; favoured is the value with the highest mean total
      log-probability.
    """
    if not len(logprobs) == len(tokens) == len(groups):
        raise ValueError(f"{len(logprobs)} / {len(tokens)} score arrays for {len(groups)} groups")
    lps, per_tok = [], []
    for g, lp, n in zip(groups, logprobs, tokens, strict=True):
        lp, n = np.asarray(lp, np.float64), np.asarray(n, np.float64)
        if lp.shape != (len(g.variants),) or n.shape != lp.shape:
            raise ValueError(f"group {g.id}: scores {lp.shape}, expected {(len(g.variants),)}")
        lps.append(lp)
        per_tok.append(lp / np.maximum(n, 1))
    out = {}
    for attr, rows in _by_attribute(groups).items():
        means = _value_means(groups, rows, lps)
        out[attr] = {
            "groups": len(rows),
            "texts": sum(len(groups[i].variants) for i in rows),
            "logprob_gap": float(np.mean([np.ptp(lps[i]) for i in rows])),
            "logprob_gap_per_token": float(np.mean([np.ptp(per_tok[i]) for i in rows])),
            "value_means": means,
            "value_means_per_token": _value_means(groups, rows, per_tok),
            **_extremes(means),
        }
    return out


def flat_metrics(result: dict[str, dict]) -> dict[str, float | int | str]:
    """``{attribute/metric: value}`` for ``eval_report.json`` and the console line.

    Numbers and the favoured / disfavoured value names; per-value means stay in the
    full result.
    """
    keep = (
        "flip_rate",
        "score_gap",
        "logprob_gap",
        "logprob_gap_per_token",
        "value_gap",
        "favoured",
        "disfavoured",
        "groups",
    )
    return {f"{a}/{k}": m[k] for a, m in result.items() for k in keep if k in m}


def unflatten(metrics: dict) -> dict[str, dict]:
    """:func:`flat_metrics` back to ``{attribute: {metric: value}}`` (no value means)."""
    out: dict[str, dict] = {}
    for key, value in metrics.items():
        attr, _, name = key.rpartition("/")
        if attr:
            out.setdefault(attr, {})[name] = value
    return out


def is_probe_result(metrics: dict) -> bool:
    """Whether a task's flat metrics are a bias probe's (``<attribute>/flip_rate``...)."""
    return any(k.endswith(("/flip_rate", "/logprob_gap")) for k in metrics)


def eval_report_sections(results: dict, base: dict | None = None) -> list[str]:
    """Markdown for ``eval_report.md``: one bias table per probe task (before / after
    columns when ``base`` has the task too), or [] when no task is a probe."""
    lines: list[str] = []
    for task, metrics in results.items():
        if not isinstance(metrics, dict) or not is_probe_result(metrics):
            continue
        cols = [("", unflatten(metrics))]
        if base and isinstance(base.get(task), dict):
            cols = [("before", unflatten(base[task])), ("after", cols[0][1])]
        lines += ["", f"## Bias probe: {task}", "", *bias_markdown(cols)]
    return lines


def bias_markdown(columns: Sequence[tuple[str, dict]]) -> list[str]:
    """A Markdown table of bias results, one row per attribute.

    Args:
      columns: (label, result) pairs of :func:`classifier_bias` or :func:`lm_bias`
        results on the same probe (e.g. ``[("before", r0), ("after", r1)]``); with one
        pair its label is not shown.

    Returns:
      Lines of the table (no trailing blank line).
    """
    cols = list(columns)
    first = cols[0][1] if cols else {}
    if not first:
        return ["(no bias probe groups)"]
    lm = "logprob_gap" in next(iter(first.values()))
    label = (lambda name: f"{name} " if name else "") if len(cols) > 1 else (lambda name: "")
    if lm:
        heads = ["log-lik gap (nats)", "per token", "favoured"]
    else:
        heads = ["flip rate", "score gap", "favoured"]
    header = ["attribute", "groups"] + [f"{label(n)}{h}" for n, _ in cols for h in heads]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for attr, m in first.items():
        cells = [attr, str(m["groups"])]
        for _, r in cols:
            a = r.get(attr)
            if a is None:
                cells += ["-"] * len(heads)
            elif lm:
                fav = _favoured(a, 2)
                cells += [f"{a['logprob_gap']:.3f}", f"{a['logprob_gap_per_token']:.3f}", fav]
            else:
                cells += [f"{a['flip_rate']:.3f}", f"{a['score_gap']:.3f}", _favoured(a, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report_section(probe: dict | None) -> str:
    """The ``## Bias probe`` Markdown section of a classifier report (or "").

    Args:
      probe: ``{"probe": spec, "attributes": classifier_bias(...)}``, or None.
    """
    if not probe or not probe.get("attributes"):
        return ""
    attrs = probe["attributes"]
    target = next(iter(attrs.values()))["target"]
    lines = [
        "",
        f"## Bias probe ({probe['probe']})",
        "",
        "Groups of texts that differ only in one attribute (a pronoun, a name, an age). "
        "Flip rate: the share of groups whose variants get different predicted classes. "
        f"Score gap: the mean over groups of the largest difference in {target} between "
        "variants. Favoured: the value with the highest mean score, and by how much it "
        "leads the lowest.",
        "",
        *bias_markdown([("", attrs)]),
    ]
    return "\n".join(lines) + "\n"


def summary_line(result: dict[str, dict]) -> str:
    """One line: ``pronoun flip 0.04 gap 0.021, age flip ...`` (or the LM gaps)."""
    parts = []
    for attr, m in result.items():
        if "flip_rate" in m:
            parts.append(f"{attr} flip {m['flip_rate']:.2f} gap {m['score_gap']:.3f}")
        else:
            parts.append(f"{attr} log-lik gap {m['logprob_gap']:.2f}")
    return ", ".join(parts)
