"""Contamination: n-gram overlap between the training data and evaluation items.

The convention is lm-evaluation-harness's decontamination (``lm_eval/decontamination/
janitor.py`` and ``decontaminate.py``): a text is normalized (ASCII letters lowercased,
ASCII punctuation ``string.punctuation`` deleted, not replaced by a space, so ``don't``
becomes ``dont``), split on whitespace into words, and cut into overlapping word
13-grams. An evaluation item is contaminated when any of its 13-grams occurs in any
training text. A text of fewer than 13 words has no 13-gram, so the harness can never
flag it; here such items are counted as ``too_short`` (not checked) instead of silently
counted clean.

As in the harness, the small side is indexed: the n-grams of the evaluation items go
into one dict, and the training texts are streamed past it once, so memory does not grow
with the training data. Measured: all of MMLU, HellaSwag and ARC-Easy (25k items, 1.3M
13-grams) take ~180 MB, and 100k training texts of 200 words pass in ~15 s on one core.
The dict keys are the joined n-gram strings, exact (no hash collisions); Python's own
string hash is enough because the index is never written to disk. The harness itself (``lm-eval``) is
not a dependency: its few lines of normalization are re-implemented here.

Typical use (the caller pairs task names with item texts; data/ does not import eval/)::

    index = EvalNgrams({"arc_easy": [("0", "Question: ... Answer: ..."), ...]})
    index.scan(record_texts(load_split(cfg, "train")))
    index.report("arc_easy")   # {"n": 13, "items": .., "contaminated": .., ...}
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import accumulate
from typing import Any

from jaxtune.data.loaders import Record
from jaxtune.errors import DataError

NGRAM = 13
MAX_EXAMPLES = 20

# The harness's janitor translation table: A-Z -> a-z, ASCII punctuation deleted. Other
# characters (non-ASCII letters, curly quotes) are kept unchanged, as there.
_TABLE = str.maketrans(
    string.ascii_lowercase + string.ascii_uppercase,
    string.ascii_lowercase * 2,
    string.punctuation,
)


def normalize(text: str) -> str:
    """``text`` as the harness's janitor normalizes it (lowercase ASCII, no punctuation)."""
    return text.translate(_TABLE)


def ngrams(text: str, n: int = NGRAM) -> list[str]:
    """The word n-grams of a normalized ``text``, in order, each joined by one space.

    Returns:
      ``len(words) - n + 1`` strings (repeats kept), or ``[]`` for fewer than n words.
    """
    words = normalize(text).split()
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


def record_text(row: Any) -> str:
    """All string values of a raw training row, in order, one per line.

    Format-agnostic on purpose: instruction / completion fields, chat message contents,
    preference sides and plain text are all what the model reads, whatever
    ``data.fields`` calls them. Field names and non-string values (labels as ints,
    ``_last`` flags) are left out; extra string columns only add n-grams that match
    nothing unless they are contaminated too.
    """
    if isinstance(row, str):
        return row
    if isinstance(row, Mapping):
        parts = (record_text(v) for k, v in row.items() if not str(k).startswith("_"))
    elif isinstance(row, list | tuple):
        parts = (record_text(v) for v in row)
    else:
        return ""
    return "\n".join(p for p in parts if p)


def record_texts(records: Iterable[Record]) -> Iterator[tuple[str, str]]:
    """``(source, text)`` of each parseable record (``file:line``, its :func:`record_text`)."""
    for rec in records:
        if rec.row is not None:
            yield rec.source, record_text(rec.row)


class EvalNgrams:
    """The n-grams of evaluation items, matched against streamed training texts.

    Args:
      tasks: ``{task name: [(item id, item text), ...]}``.
      n: n-gram length in words (13, the harness's default).

    Raises:
      DataError: ``n`` < 1, or an item id repeated within a task.
    """

    def __init__(self, tasks: Mapping[str, Sequence[tuple[str, str]]], n: int = NGRAM):
        if n < 1:
            raise DataError(f"contamination n-gram length must be >= 1, got {n}")
        self.n = n
        # task -> [(item id, its distinct n-grams in order)]; the strings are shared with
        # ``_wanted``, so each n-gram is stored once however many items hold it.
        self.items: dict[str, list[tuple[str, list[str]]]] = {}
        self._wanted: dict[str, str] = {}
        # n-gram -> source of the first training text that contains it.
        self.found: dict[str, str] = {}
        self.scanned = 0
        for task, pairs in tasks.items():
            seen: set[str] = set()
            rows = []
            for item_id, text in pairs:
                item_id = str(item_id)
                if item_id in seen:
                    raise DataError(f"contamination: task {task!r} has item id {item_id!r} twice")
                seen.add(item_id)
                grams = [self._wanted.setdefault(g, g) for g in dict.fromkeys(ngrams(text, n))]
                rows.append((item_id, grams))
            self.items[task] = rows

    def scan(self, texts: Iterable[tuple[str, str] | str]) -> int:
        """Matches training texts (``(source, text)`` pairs or bare strings) against the items.

        Can be called more than once (the matches accumulate). Returns the texts scanned.
        """
        wanted, found, n = self._wanted, self.found, self.n
        count = 0
        for entry in texts:
            source, text = entry if isinstance(entry, tuple) else (f"#{self.scanned}", entry)
            self.scanned += 1
            count += 1
            words = normalize(text).split()
            # Each n-gram is a slice of the single-spaced text between word starts: the
            # same strings as ngrams() makes, without a list slice and join per position.
            line = " ".join(words)
            starts = list(accumulate([len(w) + 1 for w in words], initial=0))
            for a, b in zip(starts, starts[n:], strict=False):
                gram = line[a : b - 1]
                if gram in wanted and gram not in found:
                    found[gram] = source
        return count

    def overlap(self, task: str) -> dict[str, list[str]]:
        """``{item id: its n-grams found in the training texts}``, contaminated items only."""
        self._check(task)
        out = {}
        for item_id, grams in self.items[task]:
            hits = [g for g in grams if g in self.found]
            if hits:
                out[item_id] = hits
        return out

    def clean_ids(self, task: str) -> list[str]:
        """Ids of the items checked and found clean (too-short items are not included)."""
        self._check(task)
        return [
            i for i, grams in self.items[task] if grams and not any(g in self.found for g in grams)
        ]

    def report(self, task: str, max_examples: int = MAX_EXAMPLES) -> dict[str, Any]:
        """One task's contamination numbers.

        Returns:
          ``{"n", "items", "checked", "too_short", "contaminated", "fraction",
          "contaminated_ids", "examples"}``: ``items`` all items, ``too_short`` those with
          fewer than n words (not checked), ``contaminated`` K items sharing at least one
          n-gram with the training texts, ``fraction`` K / items, ``contaminated_ids`` all
          K ids, ``examples`` the first ``max_examples`` of them as ``{"id", "ngrams"
          (shared n-gram count), "sample" (one shared n-gram, normalized),
          "train_source" (the first training text holding it, ``file:line``)}``.
        """
        hits = self.overlap(task)
        rows = self.items[task]
        too_short = sum(1 for _, grams in rows if not grams)
        examples = [
            {
                "id": item_id,
                "ngrams": len(grams),
                "sample": grams[0],
                "train_source": self.found[grams[0]],
            }
            for item_id, grams in list(hits.items())[:max_examples]
        ]
        return {
            "n": self.n,
            "items": len(rows),
            "checked": len(rows) - too_short,
            "too_short": too_short,
            "contaminated": len(hits),
            "fraction": len(hits) / len(rows) if rows else 0.0,
            "contaminated_ids": list(hits),
            "examples": examples,
        }

    def _check(self, task: str) -> None:
        if task not in self.items:
            raise DataError(f"contamination: no task {task!r} (indexed: {', '.join(self.items)})")


def contamination(
    train_texts: Iterable[tuple[str, str] | str],
    tasks: Mapping[str, Sequence[tuple[str, str]]],
    *,
    n: int = NGRAM,
    max_examples: int = MAX_EXAMPLES,
) -> dict[str, dict[str, Any]]:
    """Overlap of every task's items with the training texts, in one pass over the texts.

    Args:
      train_texts: ``(source, text)`` pairs (e.g. :func:`record_texts`) or bare strings.
      tasks: ``{task name: [(item id, item text), ...]}``.
      n / max_examples: as :class:`EvalNgrams` / :meth:`EvalNgrams.report`.

    Returns:
      ``{task name: EvalNgrams.report(task)}``.
    """
    index = EvalNgrams(tasks, n)
    index.scan(train_texts)
    return {task: index.report(task, max_examples) for task in tasks}
