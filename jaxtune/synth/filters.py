"""Quality filters for generated pairs: each check returns a rejection reason or None.

Reasons, in the order they are checked (a sample gets the first that applies):

* ``empty``: the reply is blank, or a parsed instruction / output is blank;
* ``too_long``: generation hit ``max_new_tokens`` (finish reason ``length``: the reply is
  probably cut off) or the reply is longer than ``max_chars``;
* ``unparseable``: the reply does not have the template's layout;
* ``repetitive``: the share of repeated word 3-grams in instruction + output is above
  ``max_repeat`` (:func:`jaxtune.eval.analysis.repeated_ngram_rate`; loops score near 1);
* ``unsupported`` (only with ``require_support``): under ``min_support`` of the
  output's content words (3+ letters, not a stop word) occur in the source document;
* ``duplicate``: the normalized pair (lowercase, punctuation dropped, whitespace
  collapsed) equals an accepted one;
* ``near_duplicate``: MinHash of its word 3-gram shingles estimates a Jaccard
  similarity >= ``near_dup_threshold`` with an accepted pair (LSH banding finds the
  candidates).

MinHash and LSH banding are implemented here in numpy (the scheme of ``datasketch``:
``(a * h + b) mod (2^61 - 1)`` permutations of 32-bit SHA-1 shingle hashes, bands chosen
to balance false positives and negatives at the threshold).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from jaxtune.eval.analysis import repeated_ngram_rate

REASONS = (
    "empty",
    "too_long",
    "unparseable",
    "repetitive",
    "unsupported",
    "duplicate",
    "near_duplicate",
)

_NON_WORD = re.compile(r"[^\w\s]")
_STOP = frozenset(
    "the and for are was were with that this from which what who whom whose when where why "
    "how its his her their our your they them then than there these those has have had not "
    "but can could would should will into onto about also each other some such only very "
    "more most many much any all been being does did done use used".split()
)
_PRIME = np.uint64((1 << 61) - 1)
_MAX_HASH = np.uint64((1 << 32) - 1)


def normalize(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: the text duplicates compare."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def pair_text(pair: dict[str, str]) -> str:
    """The text of a pair that the duplicate filters compare (instruction, input, output)."""
    return "\n".join(pair.get(f, "") for f in ("instruction", "input", "output"))


def support_share(answer: str, source: str) -> float:
    """Share of the answer's content words found in the source (1.0 if it has none)."""
    words = [w for w in normalize(answer).split() if len(w) >= 3 and w not in _STOP]
    if not words:
        return 1.0
    vocab = set(normalize(source).split())
    return sum(w in vocab for w in words) / len(words)


class MinHasher:
    """MinHash signatures of word 3-gram shingles: uint64 [num_perm] per text."""

    def __init__(self, num_perm: int = 128, seed: int = 1):
        rng = np.random.RandomState(seed)
        self.a = rng.randint(1, int(_PRIME), num_perm, dtype=np.uint64)
        self.b = rng.randint(0, int(_PRIME), num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        words = normalize(text).split()
        shingles = {" ".join(words[i : i + 3]) for i in range(max(len(words) - 2, 1))}
        h = np.array(
            [int.from_bytes(hashlib.sha1(s.encode()).digest()[:4], "little") for s in shingles],
            np.uint64,
        )
        with np.errstate(over="ignore"):  # the products wrap, as in datasketch
            perm = (h[:, None] * self.a[None, :] + self.b[None, :]) % _PRIME & _MAX_HASH
        return perm.min(axis=0)


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimizing the weighted chances of
    missing a pair above ``threshold`` (weight 0.95) and of proposing one below it (0.05).

    A proposed pair is only a candidate (its estimated similarity is checked), so misses
    weigh more: at threshold 0.8 this gives 16 bands of 8 rows, which proposes 95% of
    the pairs at similarity 0.8 and 99% at 0.85 (datasketch's equal weights: 40%, 69%).
    """
    xs = np.linspace(0.0, 1.0, 201)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1 - (1 - xs**r) ** b
            fp = np.trapezoid(np.where(xs < threshold, p, 0.0), xs)
            fn = np.trapezoid(np.where(xs >= threshold, 1 - p, 0.0), xs)
            err = 0.05 * fp + 0.95 * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


class NearDupIndex:
    """Accepted signatures, banded for lookup; :meth:`query` verifies candidates."""

    def __init__(self, threshold: float, num_perm: int = 128):
        self.threshold = threshold
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.tables: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.sigs: list[np.ndarray] = []

    def _keys(self, sig: np.ndarray) -> list[bytes]:
        r = self.rows
        return [sig[i * r : (i + 1) * r].tobytes() for i in range(self.bands)]

    def query(self, sig: np.ndarray) -> float:
        """The highest estimated Jaccard similarity with an accepted candidate (0 if none)."""
        cands = {j for t, k in zip(self.tables, self._keys(sig), strict=True) for j in t.get(k, ())}
        return max((float(np.mean(self.sigs[j] == sig)) for j in cands), default=0.0)

    def add(self, sig: np.ndarray) -> None:
        j = len(self.sigs)
        self.sigs.append(sig)
        for t, k in zip(self.tables, self._keys(sig), strict=True):
            t.setdefault(k, []).append(j)


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of the filters (CLI flags in brackets)."""

    max_chars: int = 4000  # --max-chars
    max_repeat: float = 0.5  # --max-repeat
    near_dup_threshold: float = 0.8  # --near-dup-threshold (1 turns the filter off)
    require_support: bool = False  # --require-support
    min_support: float = 0.5  # --min-support


class Filters:
    """The filters with their state: the accepted pairs seen so far (exact + near)."""

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        self.hashes: set[str] = set()
        self.hasher = MinHasher()
        self.index = NearDupIndex(cfg.near_dup_threshold) if cfg.near_dup_threshold < 1 else None

    def judge(self, text: str, finish: str, pair: dict[str, str] | None, source: str) -> str | None:
        """The first reason to reject one reply (None: accept; then call :meth:`accept`).

        Args:
          text: the generated text.
          finish: ``eos``, ``stop`` or ``length`` (from :func:`jaxtune.eval.generate.generate_ids`).
          pair: the template's parse of ``text`` (None: unparseable).
          source: the document the reply was generated from.
        """
        if not text.strip():
            return "empty"
        if finish == "length" or len(text) > self.cfg.max_chars:
            return "too_long"
        if pair is None:
            return "unparseable"
        if not pair["instruction"] or not pair["output"]:
            return "empty"
        if repeated_ngram_rate(f"{pair['instruction']} {pair['output']}") > self.cfg.max_repeat:
            return "repetitive"
        if (
            self.cfg.require_support
            and support_share(pair["output"], source) < self.cfg.min_support
        ):
            return "unsupported"
        if hashlib.sha1(normalize(pair_text(pair)).encode()).hexdigest() in self.hashes:
            return "duplicate"
        if (
            self.index is not None
            and self.index.query(self._sig(pair)) >= self.cfg.near_dup_threshold
        ):
            return "near_duplicate"
        return None

    def _sig(self, pair: dict[str, str]) -> np.ndarray:
        return self.hasher.signature(pair_text(pair))

    def accept(self, pair: dict[str, str]) -> None:
        """Records an accepted pair: later replies are compared with it."""
        self.hashes.add(hashlib.sha1(normalize(pair_text(pair)).encode()).hexdigest())
        if self.index is not None:
            self.index.add(self._sig(pair))
