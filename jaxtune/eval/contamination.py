"""The text of each evaluation item that contamination checks compare with training data.

:mod:`jaxtune.data.contamination` measures the n-gram overlap; it cannot import eval/
(a lower layer), so this module turns task names into ``(item id, text)`` pairs for it,
and ``eval.decontaminate`` masks (which items are clean) for the scorer.

Which text: lm-evaluation-harness compares a task's ``doc_to_decontamination_query``,
which is the question / context (ARC: ``Question: {question}\\nAnswer:``, HellaSwag: the
context, BoolQ: the passage). Here it is the zero-shot prompt followed by the gold
continuation, the solved item a training set would contain: every 13-gram the harness
checks is among them, and a copied answer (HellaSwag's long endings) is found too.
Few-shot examples are left out (they are other items, checked as themselves), and so is
MMLU's subject line, which every item of a subject shares.

Item ids are positions in the task (``"17"``; MMLU ``"anatomy/3"``, per subject), the
order ``jaxtune eval`` scores and ``eval.max_items`` cuts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from jaxtune.data.contamination import EvalNgrams
from jaxtune.eval import tasks as T
from jaxtune.eval.runner import COUNTERFACTUAL, PERPLEXITY, load_tasks, parse_tasks


def item_texts(items: Sequence[T.MCItem]) -> list[tuple[str, str]]:
    """``(item id, zero-shot prompt + gold continuation)`` per multiple-choice item, in order.

    Preference-pair items give prompt + chosen (their gold choice).
    """
    counters: dict[str | None, int] = {}
    out = []
    for it in items:
        k = counters[it.group] = counters.get(it.group, -1) + 1
        context = it.context
        if it.group is not None:  # MMLU: drop the subject line shared by the whole subject
            context = context.removeprefix(T.mmlu_description(it.group))
        item_id = f"{it.group}/{k}" if it.group is not None else str(k)
        out.append((item_id, context + it.choices[it.label]))
    return out


def generation_texts(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """``(item id, prompt + reference(s))`` per row of a generation task file."""
    out = []
    for i, row in enumerate(rows):
        ref = row.get("reference")
        refs = ref if isinstance(ref, list) else [ref] if ref else []
        out.append((str(i), "\n".join([row["prompt"], *refs])))
    return out


def tasks_texts(
    names: str | Sequence[str], *, limit: int | None = None
) -> dict[str, list[tuple[str, str]]]:
    """``(item id, text)`` of every item of each task of ``eval.tasks``.

    Args:
      names: task names / files as ``eval.tasks`` takes them (``perplexity`` is skipped:
        it has no items).
      limit: the first ``limit`` items per task (per subject for ``mmlu``), as
        ``eval.max_items``.

    Returns:
      ``{result key: [(item id, text), ...]}``, keys as ``jaxtune eval`` reports them (a
      task file's stem).

    Raises:
      ConfigError / DataError: as :func:`jaxtune.eval.tasks.load_task`.
    """
    picked = [n for n in parse_tasks(names) if n not in PERPLEXITY]
    out = {}
    for key, (kind, payload) in load_tasks(picked, limit=limit).items():
        if kind == COUNTERFACTUAL:  # the probe's own sentences: nothing to decontaminate
            continue
        out[key] = generation_texts(payload) if kind == "generate" else item_texts(payload)
    return out


def task_texts(name: str, *, limit: int | None = None) -> list[tuple[str, str]]:
    """:func:`tasks_texts` of one task (a built-in name or a task file)."""
    return next(iter(tasks_texts([name], limit=limit).values()))


def clean_masks(
    names: str | Sequence[str],
    train_texts: Iterable[tuple[str, str] | str],
    *,
    limit: int | None = None,
) -> tuple[dict[str, list[bool]], dict[str, dict[str, Any]]]:
    """Which items of each task share no 13-gram with the training texts.

    Args:
      names / limit: as :func:`tasks_texts` (the items ``load_tasks`` gives, in order).
      train_texts: ``(source, text)`` pairs (``jaxtune.data.contamination.record_texts``).

    Returns:
      (``{result key: [clean?] per item}``, ``{result key: contamination report}``).
      Items too short to check count as clean, as in lm-evaluation-harness (its overlap
      lookup never holds them).
    """
    texts = tasks_texts(names, limit=limit)
    if not texts:  # only perplexity: nothing to check, no pass over the training data
        return {}, {}
    index = EvalNgrams(texts)
    index.scan(train_texts)
    masks, reports = {}, {}
    for key, pairs in texts.items():
        dirty = set(index.overlap(key))
        masks[key] = [item_id not in dirty for item_id, _ in pairs]
        reports[key] = index.report(key)
    return masks, reports
