"""Which records belong to which split, and the content hash of the data files.

A split either has its own file (``data.validation``, ``data.test``) or is held out of
``data.train`` by a seeded permutation of the record indices (exact counts, independent of
content and of file order within a glob).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxtune.atomic import atomic_file
from jaxtune.data.config import DataConfig
from jaxtune.data.loaders import (
    Record,
    check_not_empty,
    count_records,
    file_kind,
    iter_file,
    open_saved_dataset,
    resolve_paths,
)
from jaxtune.errors import DataError

SPLITS = ("train", "validation", "test")


def hash_files(paths: list[Path], cache_dir: Path | None = None) -> str:
    """SHA-256 over the contents of the files (every file inside a saved dataset dir).

    Digests are memoised in ``cache_dir/file_hashes.json`` by (path, size, mtime), so a
    large unchanged file is hashed once.
    """
    memo_path = cache_dir / "file_hashes.json" if cache_dir else None
    memo: dict[str, str] = {}
    if memo_path and memo_path.exists():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
    total = hashlib.sha256()
    changed = False
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            st = f.stat()
            key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
            digest = memo.get(key)
            if digest is None:
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    while chunk := fh.read(1 << 20):
                        h.update(chunk)
                digest = memo[key] = h.hexdigest()
                changed = True
            total.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{digest};".encode())
    if memo_path and changed:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_file(memo_path, json.dumps(memo))
    return total.hexdigest()


@dataclass
class SplitSource:
    """The records of one split: lazy, re-iterable, deterministic.

    Attributes:
      split: ``train``, ``validation`` or ``test``.
      paths: the files read.
      dict_split: which DatasetDict split of a saved dataset directory is read.
      keep: for a split held out of ``data.train``, a boolean mask over record indices
        (True = this split's record); None = every record.
      max_examples: keep this many records: the first ``max_examples`` of a seeded
        permutation of the split's records (they are read in file order).
      held_out: human-readable description of the held-out split, for the report.
      seed: the seed of that permutation (``data.split_seed``).
      fraction: keep the first ``round(n * fraction)`` records of that permutation
        (``data.train_fraction``; the train split only).
    """

    split: str
    paths: list[Path]
    dict_split: str | None = None
    keep: np.ndarray | None = None
    max_examples: int | None = None
    held_out: str | None = None
    seed: int = 0
    fraction: float = 1.0

    def __iter__(self) -> Iterator[Record]:
        if self.max_examples is None and self.fraction >= 1:
            yield from self._records()
            return
        chosen = self.chosen_indices()
        for rec in self._records():
            if rec.index in chosen:
                yield rec

    def chosen_indices(self) -> set[int]:
        """The record indices kept: the first ``max_examples`` (or ``round(n *
        fraction)``, the smaller) of one seeded permutation (``seed``) of the split's
        ``n`` records.

        The permutation depends only on the seed and the number of records in the split,
        so a smaller cap's records are a subset of a larger cap's (data-size sweeps nest).
        """
        indices = np.fromiter((rec.index for rec in self._records()), dtype=np.int64)
        k = len(indices)
        if self.fraction < 1:
            k = max(1, int(round(k * self.fraction)))
        if self.max_examples is not None:
            k = min(k, self.max_examples)
        if k >= len(indices):
            return set(indices.tolist())
        perm = np.random.default_rng(self.seed).permutation(len(indices))
        return set(indices[perm[:k]].tolist())

    def _records(self) -> Iterator[Record]:
        base = 0
        for path in self.paths:
            kind = file_kind(path)
            check_not_empty(path, kind)
            last = base
            for rec in iter_file(path, base, self.dict_split):
                last = rec.index + 1
                if self.keep is not None and not self.keep[rec.index]:
                    continue
                yield rec
            # Held-out masks were built from count_records, so indices must follow it.
            base = base + count_records(path, self.dict_split) if self.keep is not None else last

    def class_label_names(self, column: str) -> list[str] | None:
        """Label names from a ``ClassLabel`` feature of a saved dataset, if there is one."""
        for path in self.paths:
            if file_kind(path) == "arrow":
                feature = open_saved_dataset(path, self.dict_split).features.get(column)
                names = getattr(feature, "names", None)
                if names:
                    return list(names)
        return None


def _holdout_mask(n: int, cfg: DataConfig, held: list[str]) -> dict[str, np.ndarray]:
    """Seeded assignment of record indices to splits, with exact counts."""
    fractions = {"validation": cfg.validation_fraction, "test": cfg.test_fraction}
    perm = np.random.default_rng(cfg.split_seed).permutation(n)
    assign = np.zeros(n, dtype=np.int8)  # 0 = train
    start = 0
    for code, name in ((1, "validation"), (2, "test")):
        if name in held:
            k = int(round(n * fractions[name]))
            assign[perm[start : start + k]] = code
            start += k
    return {"train": assign == 0, "validation": assign == 1, "test": assign == 2}


def load_split(cfg: DataConfig, split: str) -> SplitSource | None:
    """The records of one split, from its own file or held out of ``data.train``.

    A split without its own file (``data.validation`` / ``data.test`` unset) is held out of
    ``data.train`` when its fraction is positive: a seeded permutation of the record
    indices (``data.split_seed``) picks exactly ``round(n * fraction)`` records, and those
    are removed from train. The assignment depends only on the seed, the fractions and the
    number of records, not on the content.

    Args:
      cfg: the data config.
      split: ``train``, ``validation`` or ``test``.

    Returns:
      A lazy, re-iterable :class:`SplitSource` of :class:`Record`, or None when the split
      has no data.

    Raises:
      DataError: a path does not exist or has an unsupported type.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if cfg.train is None and getattr(cfg, split) is None:
        return None
    held = [
        s
        for s, frac in (("validation", cfg.validation_fraction), ("test", cfg.test_fraction))
        if getattr(cfg, s) is None and frac > 0
    ]
    if cfg.validation_fraction + cfg.test_fraction >= 1:
        raise DataError(
            "data.validation_fraction + data.test_fraction must be < 1; got "
            f"{cfg.validation_fraction} + {cfg.test_fraction}"
        )
    own = getattr(cfg, split)
    if own is not None:
        dict_split = cfg.split if split == "train" and cfg.split else split
        source = SplitSource(
            split,
            resolve_paths(own, f"data.{split}"),
            dict_split,
            None,
            cfg.max_examples,
            seed=cfg.split_seed,
            fraction=cfg.train_fraction if split == "train" else 1.0,
        )
        if split != "train" or not held:
            return source
    elif split not in held:
        return None
    train_paths = resolve_paths(cfg.train, "data.train")
    dict_split = cfg.split or "train"
    n = sum(count_records(p, dict_split) for p in train_paths)
    keep = _holdout_mask(n, cfg, held)[split]
    desc = (
        f"{int(keep.sum())} of {n} records of data.train held out by split_seed={cfg.split_seed}"
        if split != "train"
        else f"data.train minus held-out {', '.join(held)} (split_seed={cfg.split_seed})"
    )
    return SplitSource(
        split,
        train_paths,
        dict_split,
        keep,
        cfg.max_examples,
        desc,
        seed=cfg.split_seed,
        fraction=cfg.train_fraction if split == "train" else 1.0,
    )
