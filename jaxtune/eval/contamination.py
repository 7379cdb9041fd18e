"""The text of each evaluation item that contamination checks compare with training data.

:mod:`jaxtune.data.contamination` measures the n-gram overlap; it cannot import eval/
(a lower layer), so this module turns task names into ``(item id, text)`` pairs for it.

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

from collections.abc import Sequence

from jaxtune.eval import tasks as T
from jaxtune.eval.runner import PERPLEXITY, file_task_kind, read_generation_task


def task_texts(name: str, *, limit: int | None = None) -> list[tuple[str, str]]:
    """``(item id, text)`` of every item of one task (a built-in name or a task file).

    Args:
      name: a task name as ``eval.tasks`` takes it (``arc_easy``, ``mmlu``,
        ``mmlu_anatomy``, ``my_task.jsonl``); not ``perplexity``.
      limit: the first ``limit`` items (per subject for ``mmlu``), as ``eval.max_items``.

    Returns:
      One pair per item: multiple-choice items give prompt + gold continuation, preference
      pairs prompt + chosen, generation files prompt + reference(s).

    Raises:
      ConfigError / DataError: as :func:`jaxtune.eval.tasks.load_task`.
    """
    name = T.resolve_task(name)
    if T.is_file_task(name) and file_task_kind(name) == "generate":
        rows = read_generation_task(name)
        rows = rows[:limit] if limit else rows
        out = []
        for i, row in enumerate(rows):
            ref = row["reference"]
            refs = ref if isinstance(ref, list) else [ref] if ref else []
            out.append((str(i), "\n".join([row["prompt"], *refs])))
        return out
    items = T.load_task(name, num_fewshot=0, limit=limit)
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


def tasks_texts(
    names: Sequence[str], *, limit: int | None = None
) -> dict[str, list[tuple[str, str]]]:
    """:func:`task_texts` of each task of ``eval.tasks`` (``perplexity`` skipped).

    Keys are the result keys ``jaxtune eval`` uses (a task file's stem).
    """
    out = {}
    for name in names:
        if name.strip() in PERPLEXITY:
            continue
        resolved = T.resolve_task(name)
        key = T.file_task_name(resolved) if T.is_file_task(resolved) else resolved
        out[key] = task_texts(resolved, limit=limit)
    return out
