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

MinHash signatures and the LSH index are ``datasketch``'s.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from datasketch import MinHash, MinHashLSH

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
NUM_PERM = 128


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


def shingles(text: str) -> set[str]:
    """Word 3-grams of the normalized text (the whole text when it has under 3 words)."""
    words = normalize(text).split()
    return {" ".join(words[i : i + 3]) for i in range(max(len(words) - 2, 1))}


def minhash(text: str, num_perm: int = NUM_PERM) -> MinHash:
    """datasketch MinHash of the text's word 3-gram shingles (fixed seed: reproducible)."""
    m = MinHash(num_perm=num_perm, seed=1)
    m.update_batch([s.encode() for s in shingles(text)])
    return m


class NearDupIndex:
    """Accepted pairs in a datasketch ``MinHashLSH``; :meth:`query` verifies candidates.

    LSH only proposes candidates, and each is checked against its estimated Jaccard
    similarity, so a false positive costs a comparison while a miss lets a near duplicate
    through: the band layout weighs misses 0.95 and false positives 0.05 (at threshold
    0.8: 16 bands of 8 rows, proposing 95% of the pairs at similarity 0.8; datasketch's
    default equal weights propose 40%).
    """

    def __init__(self, threshold: float, num_perm: int = NUM_PERM):
        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95))
        self.sigs: list[MinHash] = []

    def query(self, sig: MinHash) -> float:
        """The highest estimated Jaccard similarity with an accepted candidate (0 if none)."""
        return max((sig.jaccard(self.sigs[j]) for j in self.lsh.query(sig)), default=0.0)

    def add(self, sig: MinHash) -> None:
        self.lsh.insert(len(self.sigs), sig)
        self.sigs.append(sig)


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

    def _sig(self, pair: dict[str, str]) -> MinHash:
        return minhash(pair_text(pair))

    def accept(self, pair: dict[str, str]) -> None:
        """Records an accepted pair: later replies are compared with it."""
        self.hashes.add(hashlib.sha1(normalize(pair_text(pair)).encode()).hexdigest())
        if self.index is not None:
            self.index.add(self._sig(pair))
