"""Evaluation reports: ``eval_report.json`` and ``eval_report.md`` (+ before/after tables).

``eval_report.json`` is ``{task: {metric: value}}`` for the evaluated model. With a base
model (``jaxtune eval --compare BASE``) the base results go to ``eval_report_base.json``
and ``eval_compare.json`` holds ``{task: {metric: {"base", "model", "delta"}}}``; the
Markdown report then shows both side by side in one table; a bias-probe task
(``counterfactual``) also gets its own per-attribute table. Run details (model paths,
options, timings) go to ``eval_meta.json``. Given a contamination check (the items that
share a 13-gram with the training data), ``contamination.json`` holds it and the Markdown
report ends with its Contamination section.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from jaxtune.atomic import atomic_file
from jaxtune.data.report import contamination_markdown
from jaxtune.eval.counterfactual import eval_report_sections

# Metrics shown in the Markdown tables, in this order (others stay in the JSON only).
SHOWN = (
    "acc",
    "acc_norm",
    "acc_micro",
    "loss",
    "perplexity",
    "exact_match",
    "f1",
    "empty_rate",
    "truncated_rate",
    "repeated_3gram_rate",
    "degenerate_rate",
    "tokens_mean",
    "tokens_per_sec",
)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _signed(v) -> str:
    return "-" if v is None else f"{v:+.4f}"


def _is_sub(task: str, results: dict) -> bool:
    """MMLU subjects are listed after the main table (57 rows)."""
    return task.startswith("mmlu_") and "mmlu" in results


def compare_results(base: dict, model: dict) -> dict:
    """``{task: {metric: {"base", "model", "delta"}}}`` over tasks and numeric metrics."""
    out = {}
    for task in [*model, *(t for t in base if t not in model)]:
        b, m = base.get(task, {}), model.get(task, {})
        row = {}
        for k in [*m, *(k for k in b if k not in m)]:
            bv, mv = b.get(k), m.get(k)
            num = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (bv, mv))
            row[k] = {"base": bv, "model": mv, "delta": (mv - bv) if num else None}
        out[task] = row
    return out


def markdown_table(results: dict) -> str:
    """One row per task; columns: the shown metrics any task has, then ``n``."""
    tasks = [t for t in results if not _is_sub(t, results)]
    cols = [k for k in SHOWN if any(k in results[t] for t in tasks)]
    lines = ["| task | " + " | ".join(cols) + " | n |", "|---" * (len(cols) + 2) + "|"]
    for t in tasks:
        r = results[t]
        n = r.get("n", r.get("tokens", "-"))
        lines.append(f"| {t} | " + " | ".join(_fmt(r.get(k)) for k in cols) + f" | {_fmt(n)} |")
    subs = [t for t in results if _is_sub(t, results)]
    if subs:
        lines += ["", "MMLU subjects:", "", "| subject | acc | acc_norm | n |", "|---|---|---|---|"]
        for t in subs:
            r = results[t]
            lines.append(
                f"| {t[5:]} | {_fmt(r.get('acc'))} | {_fmt(r.get('acc_norm'))} | {r.get('n')} |"
            )
    return "\n".join(lines) + "\n"


def compare_table(base: dict, model: dict, labels: tuple[str, str] = ("before", "after")) -> str:
    """One table: a row per (task, metric) with the base value, the model value and the change."""
    cmp = compare_results(base, model)
    lines = [
        f"| task | metric | {labels[0]} | {labels[1]} | change |",
        "|---|---|---|---|---|",
    ]
    subs = []
    for task, row in cmp.items():
        if _is_sub(task, model) or _is_sub(task, base):
            subs.append(task)
            continue
        for k in [k for k in SHOWN if k in row]:
            c = row[k]
            lines.append(
                f"| {task} | {k} | {_fmt(c['base'])} | {_fmt(c['model'])} | {_signed(c['delta'])} |"
            )
        n = row.get("n")
        if n is not None:
            lines.append(f"| {task} | n | {_fmt(n['base'])} | {_fmt(n['model'])} | |")
    if subs:
        lines += [
            "",
            "MMLU subjects (acc):",
            "",
            f"| subject | {labels[0]} | {labels[1]} | change |",
            "|---|---|---|---|",
        ]
        for t in subs:
            c = cmp[t].get("acc", {"base": None, "model": None, "delta": None})
            lines.append(
                f"| {t[5:]} | {_fmt(c['base'])} | {_fmt(c['model'])} | {_signed(c['delta'])} |"
            )
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str | Path,
    results: dict,
    *,
    base: dict | None = None,
    meta: dict | None = None,
    labels: tuple[str, str] = ("before", "after"),
    contamination: dict | None = None,
) -> dict[str, Path]:
    """Writes the JSON and Markdown reports; returns their paths by name.

    Args:
      out_dir: directory (created).
      results: ``{task: {metric: value}}`` of the evaluated model.
      base: the same for a base model (side-by-side comparison), or None.
      meta: run details for ``eval_meta.json`` and the Markdown header (``model``,
        ``base_model``, ``num_fewshot``, ``limit``...).
      labels: column names of base and model in the comparison table.
      contamination: ``{task: report}``
        (:func:`jaxtune.eval.contamination.clean_masks`), or None / empty for none.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    paths = {"json": out / "eval_report.json", "md": out / "eval_report.md"}
    atomic_file(paths["json"], json.dumps(results, indent=2) + "\n")
    header = ["# jaxtune evaluation", ""]
    for k in ("model", "base_model", "tasks", "num_fewshot", "limit", "seconds"):
        if meta.get(k) is not None:
            header.append(f"- {k}: `{meta[k]}`")
    body = markdown_table(results)
    if base is not None:
        paths["base_json"] = out / "eval_report_base.json"
        paths["compare_json"] = out / "eval_compare.json"
        atomic_file(paths["base_json"], json.dumps(base, indent=2) + "\n")
        atomic_file(
            paths["compare_json"], json.dumps(compare_results(base, results), indent=2) + "\n"
        )
        body = compare_table(base, results, labels)
    probes = eval_report_sections(results, base)
    if probes:
        body += "\n".join(probes) + "\n"
    if contamination:
        paths["contamination"] = out / "contamination.json"
        atomic_file(paths["contamination"], json.dumps(contamination, indent=1) + "\n")
        body += "\n" + "\n".join(contamination_markdown(contamination))
    atomic_file(paths["md"], "\n".join(header) + "\n\n" + body)
    paths["meta"] = out / "eval_meta.json"
    atomic_file(paths["meta"], json.dumps(meta, indent=2, default=str) + "\n")
    return paths
