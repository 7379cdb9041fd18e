"""``run_dir/report.md``: the one page a person reads after a run.

Built from the run directory's files alone (so any script can add a section and write it
again, as ``make quickstart`` adds its test-set table):

1. the run: model, method, steps, stop reason, parameters, time, speed (``summary.json``,
   ``config.yaml``, ``metrics.jsonl``);
2. data: the numbers table of ``jaxtune data inspect`` for every split (``summary.json``'s
   ``data``);
3. training: ``loss_curve.png``, final train loss, best and final validation loss;
4. evaluation before/after (``eval/step_0.json`` and ``eval/eval_report.json``);
5. retention (``eval/retention.json``);
6. contamination of the scored tasks (``eval/contamination.json``,
   ``eval/retention_contamination.json``);
7. generation samples before/after with their error categories, and the category counts
   (``eval/samples_before.jsonl``, ``eval/samples_after.jsonl``).

A section without its inputs says what would produce it (the config key), so a missing
number is never silent.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import yaml

from jaxtune.atomic import atomic_file
from jaxtune.data.report import contamination_markdown, markdown_summary
from jaxtune.eval.analysis import CATEGORIES
from jaxtune.eval.report import compare_table, markdown_table
from jaxtune.train.retention import BEFORE, CONTAMINATION, RESULT
from jaxtune.train.samples import FILES as SAMPLE_FILES

SAMPLE_CHARS = 300  # longer prompts / answers are shortened in the table (full text: jsonl)


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _cell(text: str, limit: int = SAMPLE_CHARS) -> str:
    """One Markdown table cell: newlines shown as ⏎, pipes escaped, long text shortened."""
    text = str(text)
    if len(text) > limit:
        text = "…" + text[-limit:] if limit else ""
    return text.replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ") or "(empty)"


def _run_section(run_dir: Path, cfg: dict, summary: dict, rows: list[dict]) -> list[str]:
    model, peft, train = cfg.get("model", {}), cfg.get("peft", {}), cfg.get("train", {})
    method = peft.get("method", "?")
    if method in ("lora", "dora"):
        method += f" r={peft.get('rank')} alpha={peft.get('alpha')} on {peft.get('targets')}"
    params = summary.get("params") or {}
    speeds = [r["tokens_per_sec"] for r in rows if r.get("step", 0) > 1 and "tokens_per_sec" in r]
    out = [
        f"- model: `{model.get('path')}` ({model.get('dtype')})",
        f"- method: {method}; objective `{train.get('objective', 'sft')}`",
        f"- steps: {summary.get('steps')} ({summary.get('stop_reason')}); batch "
        f"{train.get('batch_size')} x {train.get('seq_len')} tokens, grad_accum "
        f"{train.get('grad_accum', 1)}",
    ]
    if params.get("trainable") is not None:
        total = params.get("total") or 0
        share = f" ({100 * params['trainable'] / total:.2f}% of {total:,})" if total else ""
        out.append(f"- trainable parameters: {params['trainable']:,}{share}")
    if summary.get("seconds") is not None:
        speed = f", median {statistics.median(speeds):,.0f} tokens/s" if speeds else ""
        out.append(f"- wall time of the last invocation: {summary['seconds']:.0f} s{speed}")
    out.append(f"- files: `{run_dir}` (config.yaml, metrics.jsonl, checkpoints/, eval/)")
    return out


def _training_section(run_dir: Path, rows: list[dict]) -> list[str]:
    out = []
    if (run_dir / "loss_curve.png").exists():
        out += ["![loss curves](loss_curve.png)", ""]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    if losses:
        out.append(f"- train loss: {losses[0]:.4f} at step 1 -> {losses[-1]:.4f} at the end")
    if evals:
        best = min(evals, key=lambda t: t[1])
        out.append(
            f"- validation loss: best {best[1]:.4f} (step {best[0]}), last {evals[-1][1]:.4f} "
            f"(step {evals[-1][0]})"
        )
    else:
        out.append("- validation loss: none (no data.validation / held-out split)")
    return out


def _eval_section(run_dir: Path) -> list[str]:
    last = _json(run_dir / "eval" / "eval_report.json")
    if last is None:
        return ["No evaluation tasks ran (set `eval.tasks`, e.g. `[arc_easy, my_task.jsonl]`)."]
    base = _json(run_dir / "eval" / "step_0.json")
    if base is None:
        return [
            "After training (no step-0 scores: `eval.at_start` was off):",
            "",
            markdown_table(last),
        ]
    return [compare_table(base, last)]


def _retention_section(run_dir: Path, cfg: dict) -> list[str]:
    r = _json(run_dir / "eval" / RESULT)
    if r is None:
        if not (cfg.get("eval") or {}).get("retention"):
            return ["Off (`eval.retention: []`)."]
        if (run_dir / "eval" / BEFORE).exists():
            return ["Base scores measured; the trained model is scored when the run completes."]
        return ["Not measured for this run (a classifier head, or several hosts)."]
    out = [
        f"General benchmarks scored zero-shot on the first {r.get('items')} items each, before "
        f"the first step (the base model; {r.get('before_source')}) and after step "
        f"{r.get('step')}. Change = after - before; negative = forgotten.",
        "",
        "| task | metric | before | after | change | n |",
        "|---|---|---|---|---|---|",
    ]
    for t, v in r["tasks"].items():
        out.append(
            f"| {t} | {v['metric']} | {v['before']:.4f} | {v['after']:.4f} | "
            f"{v['change']:+.4f} | {v.get('n')} |"
        )
    out.append(f"| **mean** | | {r['before']:.4f} | {r['after']:.4f} | **{r['change']:+.4f}** | |")
    return out


def _samples_section(run_dir: Path) -> list[str]:
    before = _jsonl(run_dir / "eval" / SAMPLE_FILES["before"])
    after = _jsonl(run_dir / "eval" / SAMPLE_FILES["after"])
    if not before and not after:
        return ["None (`eval.generate_samples: 0`, or a classifier head)."]
    rows = max(len(before), len(after))
    split = (after or before)[0].get("split")
    note = " (training examples: no held-out split)" if split == "train" else ""
    out = [
        f"Greedy answers to the first {rows} {split} prompts{note}, cut where training "
        "starts; the reference is the trained text.",
        "",
        "| # | prompt | reference | before | after |",
        "|---|---|---|---|---|",
    ]
    for i in range(rows):
        b = before[i] if i < len(before) else None
        a = after[i] if i < len(after) else None
        first = a or b
        cells = [f"{_cell(s['output'])} *({s['category']})*" if s else "-" for s in (b, a)]
        out.append(
            f"| {i + 1} | {_cell(first['prompt'])} | {_cell(first['reference'])} | "
            f"{cells[0]} | {cells[1]} |"
        )
    out += ["", "Error analysis (answers per category):", ""]
    out += ["| | " + " | ".join(CATEGORIES) + " |", "|---" * (len(CATEGORIES) + 1) + "|"]
    for label, samples in (("before", before), ("after", after)):
        if samples:
            counts = [sum(s["category"] == c for s in samples) for c in CATEGORIES]
            out.append(f"| {label} | " + " | ".join(map(str, counts)) + " |")
    return out


def write_run_report(run_dir: str | Path, extra: Sequence[tuple[str, Sequence[str]]] = ()) -> Path:
    """Writes ``run_dir/report.md`` from the run directory's files; returns its path.

    Args:
      run_dir: a jaxtune run directory.
      extra: ``(title, Markdown lines)`` sections placed right after the run summary
        (e.g. a task-specific before/after table).
    """
    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    summary = _json(run_dir / "summary.json") or {}
    rows = _jsonl(run_dir / "metrics.jsonl")
    name = (cfg.get("run") or {}).get("name") or run_dir.name
    out = [f"# Run report: {name}", "", *_run_section(run_dir, cfg, summary, rows), ""]
    for title, lines in extra:
        out += [f"## {title}", "", *lines, ""]
    data = summary.get("data")
    out += ["## Data", ""]
    out += markdown_summary(data) if data else ["Not recorded (`jaxtune data inspect` shows it)."]
    out += ["", "## Training", "", *_training_section(run_dir, rows), ""]
    if (run_dir / "classification_report.md").exists():
        out += ["Classification metrics: [classification_report.md](classification_report.md)", ""]
    out += ["## Evaluation before / after", "", *_eval_section(run_dir), ""]
    out += ["## Retention", "", *_retention_section(run_dir, cfg), ""]
    contamination = _json(run_dir / "eval" / "contamination.json") or {}
    retained = _json(run_dir / "eval" / CONTAMINATION) or {}
    contamination.update({f"{t} (retention)": c for t, c in retained.items()})
    if contamination:
        out += [*contamination_markdown(contamination), ""]
    else:
        out += ["## Contamination", "", "No evaluation task was checked (none ran).", ""]
    out += ["## Generation samples", "", *_samples_section(run_dir), ""]
    path = run_dir / "report.md"
    atomic_file(path, "\n".join(out).rstrip() + "\n")
    return path
