"""``jaxtune data inspect``: a report on the data before any training step runs.

:func:`inspect_data` builds every split (through the same cache as training), then
writes to ``out_dir``:

* ``report.json``: all numbers, per split;
* ``report.md``: the same as tables, plus three rendered examples per split with the
  untrained part (the prompt) in ``[[...]]``;
* ``lengths.png``: token-length histogram per split (lengths before truncation), with
  ``seq_len`` marked;

and prints a console table. Given evaluation items (``eval.tasks``, paired with their
texts by the CLI), the report also has a Contamination section: per task, the items that
share a 13-gram with the training split (:mod:`jaxtune.data.contamination`). For
classification data it has a Class balance section: the label distribution per split,
an imbalance flag and the suggested ``data.balance`` (:mod:`jaxtune.data.balance`). It
returns the ``report.json`` content.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.data.balance import FEW_EXAMPLES, IMBALANCE_RATIO, LARGE, imbalance_advice
from jaxtune.data.config import DataConfig
from jaxtune.data.contamination import NGRAM, contamination, record_texts
from jaxtune.data.iterator import BatchIterator, padding_fraction
from jaxtune.data.splits import SPLITS, load_split
from jaxtune.data.tokenized import TokenizedDataset, build_datasets

NUM_RENDERED = 3


def render_example(ds: TokenizedDataset, i: int, tokenizer) -> str:
    """Example ``i`` as text, untrained tokens in ``[[...]]`` (the label appended)."""
    ids, mask = ds.example(i)
    parts, start = [], 0
    # Token 0 is never a target, so it shares the run of the token after it.
    flags = mask.astype(bool).copy()
    if len(flags) > 1:
        flags[0] = flags[1]
    for t in range(1, len(ids) + 1):
        if t == len(ids) or flags[t] != flags[start]:
            text = tokenizer.decode(ids[start:t].tolist(), skip_special_tokens=False)
            parts.append(text if flags[start] else f"[[{text}]]")
            start = t
    out = "".join(parts)
    if ds.labels is not None:
        out += f"  -> label {ds.label_names[int(ds.labels[i])]!r}"
    if ds.full_lengths[i] > len(ids):
        out += f"  (truncated from {int(ds.full_lengths[i])} tokens)"
    return out


def _rendered(ds: TokenizedDataset, tokenizer) -> list[str]:
    if not ds.paired:
        return [render_example(ds, i, tokenizer) for i in range(min(NUM_RENDERED, ds.num_examples))]
    return [
        f"chosen:   {render_example(ds, 2 * k, tokenizer)}\n"
        f"rejected: {render_example(ds, 2 * k + 1, tokenizer)}"
        for k in range(min(NUM_RENDERED, len(ds)))
    ]


def split_report(ds: TokenizedDataset, batch_size: int, seed: int, tokenizer) -> dict[str, Any]:
    """Numbers and rendered examples of one split (preference: per pair, its longer side)."""
    s = dict(ds.stats)
    lengths = ds.full_lengths.astype(np.int64)
    if ds.paired:  # a pair needs its longer side on one batch line
        lengths = lengths.reshape(-1, 2).max(axis=1)
    targets = int(ds.offsets[-1]) - ds.num_examples  # the last token of each has no target
    it = BatchIterator(ds, min(batch_size, len(ds)), seed=seed, drop_remainder=False)
    s.update(
        truncated_pct=100.0 * s["truncated"] / max(ds.num_examples, 1),
        padding_pct=100.0 * padding_fraction(it),
        # Classification trains a head on labels, not tokens: no token coverage to show.
        loss_mask_coverage_pct=None
        if ds.labels is not None
        else 100.0 * s["trained_tokens"] / max(targets, 1),
        length_mean=float(lengths.mean()),
        length_p50=int(np.percentile(lengths, 50)),
        length_p95=int(np.percentile(lengths, 95)),
        length_max=int(lengths.max()),
        seq_len=ds.seq_len,
        source_files=ds.source_paths,
        held_out=ds.held_out,
        packed=ds.packed,
        rendered=_rendered(ds, tokenizer),
    )
    if ds.label_names is not None:
        s["label_names"] = ds.label_names
    if s.get("balance", {}).get("mode") in ("oversample", "undersample"):
        s["balanced_counts"] = s["balance"]["after"]
    return s


def _histogram(datasets: dict[str, TokenizedDataset], seq_len: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    top = max(int(ds.full_lengths.max()) for ds in datasets.values())
    bins = np.linspace(0, max(top, seq_len) + 1, 50)
    for name, ds in datasets.items():
        ax.hist(ds.full_lengths, bins=bins, alpha=0.6, label=f"{name} ({ds.num_examples})")
    ax.axvline(seq_len, color="k", linestyle="--", label=f"seq_len={seq_len}")
    ax.set_xlabel("tokens per example (before truncation)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_ROWS = [
    ("records read", "records", "{}"),
    ("examples", "examples", "{}"),
    ("rows (after packing)", "rows", "{}"),
    ("preference pairs", "pairs", "{}"),
    ("truncated pairs", "truncated_pairs", "{}"),
    ("pairs with chosen == rejected", "identical_pairs", "{}"),
    ("skipped invalid", "skipped", "{}"),
    ("truncated", "truncated_pct", "{:.1f}%"),
    ("padding", "padding_pct", "{:.1f}%"),
    ("loss-mask coverage", "loss_mask_coverage_pct", "{:.1f}%"),
    ("tokens", "tokens", "{}"),
    ("length mean / p95 / max", None, None),
    ("duplicates in split", "duplicates", "{}"),
    ("overlap with other splits", "overlap", None),
    ("missing optional fields", "missing_fields", None),
    ("empty fields", "empty_fields", None),
    ("label balance", "label_counts", None),
    ("after data.balance", "balanced_counts", None),
]


def _cell(s: dict[str, Any], key: str | None, fmt: str | None) -> str:
    if key is None:
        return f"{s['length_mean']:.0f} / {s['length_p95']} / {s['length_max']}"
    value = s.get(key)
    if value is None:
        return "-"
    if key in ("label_counts", "balanced_counts"):  # counts with their shares
        total = max(sum(value.values()), 1)
        return ", ".join(f"{k}: {v} ({100 * v / total:.1f}%)" for k, v in value.items())
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    return fmt.format(value) if fmt else str(value)


def _table(report: dict[str, Any]) -> list[list[str]]:
    splits = list(report["splits"])
    rows = [["", *splits]]
    for title, key, fmt in _ROWS:
        optional = ("label_counts", "balanced_counts", "pairs", "truncated_pairs")
        optional += ("identical_pairs",)
        if key in optional and all(key not in report["splits"][s] for s in splits):
            continue
        rows.append([title, *(_cell(report["splits"][s], key, fmt) for s in splits)])
    return rows


def format_console(report: dict[str, Any]) -> str:
    """The report as a fixed-width text table."""
    rows = _table(report)
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_summary(report: dict[str, Any]) -> list[str]:
    """Markdown lines: the settings line, each split's source files, the numbers table.

    Args:
      report: ``{"format", "seq_len", "packing", "batch_size", "splits": {split:
        :func:`split_report`}}`` (``rendered`` examples are not needed here).
    """
    rows = _table(report)
    out = [
        f"format `{report['format']}`, seq_len {report['seq_len']}, "
        f"packing {report['packing']}, batch size {report['batch_size']}",
        "",
    ]
    for name, s in report["splits"].items():
        where = ", ".join(f"`{p}`" for p in s["source_files"])
        out.append(f"- {name}: {where}" + (f" ({s['held_out']})" if s["held_out"] else ""))
    out += ["", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return out


def format_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: config summary, table, skipped rows, rendered examples."""
    out = ["# Data report", "", *markdown_summary(report)]
    out += ["", "![token lengths](lengths.png)", ""]
    if report.get("class_balance"):
        out += class_balance_markdown(report["class_balance"])
    if report.get("contamination"):
        out += contamination_markdown(report["contamination"])
    for name, s in report["splits"].items():
        if s.get("skipped_examples"):
            out += [f"## Skipped rows in {name}", ""]
            out += [f"- {m}" for m in s["skipped_examples"]] + [""]
        out += [f"## Examples from {name} (untrained part in [[...]])", ""]
        for text in s["rendered"]:
            out += ["```", text.replace("```", "` ` `"), "```", ""]
    return "\n".join(out)


def class_balance_lines(report: dict[str, Any]) -> list[str]:
    """Console lines of the report's ``class_balance`` section (none when balanced)."""
    b = report.get("class_balance")
    if not b:
        return []
    lines = [f"warning: {w}" for w in b["warnings"]]
    if b["imbalanced"]:
        lines.insert(0, f"class imbalance: {b['reason']}; suggested: data.balance={b['suggest']}")
    return lines


def class_balance_markdown(b: dict[str, Any]) -> list[str]:
    """Markdown lines of the Class balance section (:func:`imbalance_advice`'s dict)."""
    out = [
        "## Class balance",
        "",
        f"Rule: the train split is flagged as imbalanced when its largest class has at least "
        f"{IMBALANCE_RATIO}x the examples of its smallest (here {b['ratio']:.2f}x: "
        f"{b['majority']} / {b['minority']}). The suggestion is `data.balance=weight`, or "
        f"`oversample` when the smallest class has fewer than {FEW_EXAMPLES} examples; "
        f"`undersample` is mentioned from {LARGE} examples of the smallest class on.",
        "",
    ]
    if b["imbalanced"]:
        out += [f"**Imbalanced**: {b['reason']}. Suggested: `data.balance={b['suggest']}`.", ""]
    else:
        out += ["Balanced enough: no `data.balance` needed.", ""]
    out += [f"- warning: {w}" for w in b["warnings"]]
    return out + ([""] if b["warnings"] else [])


def contamination_lines(report: dict[str, Any]) -> list[str]:
    """One console line per task of the report's ``contamination`` section."""
    lines = []
    for task, c in report.get("contamination", {}).items():
        short = f"; {c['too_short']} too short to check" if c["too_short"] else ""
        lines.append(
            f"contamination {task}: {c['contaminated']}/{c['items']} items share a "
            f"{c['n']}-gram with the training data ({100 * c['fraction']:.1f}%{short})"
        )
    return lines


def contamination_markdown(sections: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines of a Contamination section: a table, then each task's listed items.

    Args:
      sections: ``{task: report}`` as :func:`~jaxtune.data.contamination.contamination`.
    """
    out = [
        "## Contamination",
        "",
        f"Items of each evaluation task that share a word {NGRAM}-gram with the training "
        "split (lm-evaluation-harness's decontamination convention: lowercased, punctuation "
        f"removed). Items of fewer than {NGRAM} words are too short to check.",
        "",
        "| task | items | checked | too short | contaminated | fraction |",
        "|---|---|---|---|---|---|",
    ]
    for task, c in sections.items():
        out.append(
            f"| {task} | {c['items']} | {c['checked']} | {c['too_short']} | "
            f"{c['contaminated']} | {100 * c['fraction']:.1f}% |"
        )
    out.append("")
    for task, c in sections.items():
        if not c["contaminated"]:
            continue
        more = c["contaminated"] - len(c["examples"])
        out += [f"### Contaminated items of {task}", ""]
        out += [
            f"- item `{e['id']}`: {e['ngrams']} shared {c['n']}-grams, e.g. "
            f'"{e["sample"]}" (training text `{e["train_source"]}`)'
            for e in c["examples"]
        ]
        if more > 0:
            out.append(f"- and {more} more (all ids in report.json)")
        out.append("")
    return out


def data_summary(
    cfg: DataConfig,
    datasets: Mapping[str, TokenizedDataset],
    tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """``{"format", "seq_len", "packing", "batch_size", "splits": {split: split_report}}``
    of already built splits (the trainer's run report; :func:`inspect_data`), plus
    ``class_balance`` for classification data."""
    splits = {n: split_report(ds, batch_size, seed, tokenizer) for n, ds in datasets.items()}
    out = {
        "format": cfg.format,
        "seq_len": seq_len,
        "packing": cfg.packing,
        "batch_size": batch_size,
        "splits": splits,
    }
    if "label_counts" in splits.get("train", {}):
        counts = {n: s["label_counts"] for n, s in splits.items() if "label_counts" in s}
        out["class_balance"] = imbalance_advice(counts)
    return out


def inspect_data(
    cfg: DataConfig,
    tokenizer,
    seq_len: int,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    seed: int = 0,
    echo: bool = True,
    eval_items: Mapping[str, Sequence[tuple[str, str]]] | None = None,
) -> dict[str, Any]:
    """Builds the data as training would and writes the report files.

    Args:
      cfg: the ``data`` config section.
      tokenizer: the model's tokenizer.
      seq_len: ``train.seq_len``.
      out_dir: directory for ``report.json``, ``report.md`` and ``lengths.png``.
      batch_size: batch size used to measure padding.
      seed: order seed used to measure padding (padding depends on batch composition).
      echo: print the console table.
      eval_items: ``{task: [(item id, item text), ...]}`` to check for contamination
        against the training split's records; None or empty = no check (no extra pass).

    Returns:
      The report: ``format``, ``seq_len``, ``packing``, ``batch_size``, ``files``
      (written paths) and ``splits`` (per split: the dataset stats plus
      ``truncated_pct``, ``padding_pct``, ``loss_mask_coverage_pct``, length summary and
      ``rendered`` examples), for classification data ``class_balance`` (as
      :func:`~jaxtune.data.balance.imbalance_advice`), and with ``eval_items``
      ``contamination`` (per task, as
      :meth:`~jaxtune.data.contamination.EvalNgrams.report`).

    Raises:
      DataError: as :func:`~jaxtune.data.build_datasets`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets = build_datasets(cfg, tokenizer, seq_len, SPLITS)
    report = data_summary(cfg, datasets, tokenizer, seq_len, batch_size, seed)
    if eval_items:
        train = load_split(cfg, "train")
        texts = record_texts(train) if train is not None else ()
        report["contamination"] = contamination(texts, eval_items)
    files = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "histogram": out / "lengths.png",
    }
    report["files"] = {k: str(v) for k, v in files.items()}
    _histogram(datasets, seq_len, files["histogram"])
    files["markdown"].write_text(format_markdown(report), encoding="utf-8")
    files["json"].write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    if echo:
        print(format_console(report))  # the CLI prints where the report went, once
        for line in class_balance_lines(report) + contamination_lines(report):
            print(line)
    return report
