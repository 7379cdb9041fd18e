"""Tokenize once, cache on disk, memory-map: :class:`TokenizedDataset` and its builder.

The cache key is a hash of the data files' contents, the split assignment, everything in
the data config that changes tokens or masks, the tokenizer (its vocabulary/model, special
tokens and chat template) and ``seq_len``. Packing and padding are not in the key: they
are cheap and are redone when a cached dataset is opened.

A cache entry is a directory of flat arrays: ``tokens.bin`` (int32), ``mask.bin`` (uint8,
1 = trained target), ``offsets.npy`` (int64 [N + 1]), ``labels.npy``, ``hashes.npy`` (uint64
per example: duplicates, overlaps), ``full_lengths.npy`` (before truncation), ``meta.json``
(stats), written to a temporary directory and renamed into place (never half-written).
"""

from __future__ import annotations

import array
import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.atomic import cache_entry
from jaxtune.data.balance import apply_balance, check_balance
from jaxtune.data.config import DataConfig
from jaxtune.data.encoding import Encoded, resolve_label_names
from jaxtune.data.formats import make_encoder
from jaxtune.data.loaders import RowError
from jaxtune.data.packing import pack_lengths, padded_length
from jaxtune.data.preference import Pair, pair_examples
from jaxtune.data.splits import SPLITS, SplitSource, hash_files, load_split
from jaxtune.errors import DataError

CACHE_VERSION = 3  # 2: chat BOS, turn terminators; 3: max_examples a seeded subset
ENCODE_BATCH = 256
MAX_SKIP_MESSAGES = 5


def default_cache_dir(cfg: DataConfig) -> Path:
    return Path(os.path.expanduser(cfg.cache_dir or "~/.cache/jaxtune/data"))


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what determines a tokenizer's output: model/vocab, specials, chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    sp_model = getattr(tokenizer, "sp_model", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    elif sp_model is not None:
        h.update(sp_model.serialized_model_proto())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    template = tokenizer.chat_template
    specials = [str(template), str(getattr(tokenizer, "special_tokens_map", ""))]
    specials.append(str(tokenizer("Hello world.\n a", add_special_tokens=True)["input_ids"]))
    h.update(json.dumps(specials).encode())
    return h.hexdigest()


def _example_hash(ids: list[int]) -> int:
    digest = hashlib.blake2b(np.asarray(ids, dtype=np.int32).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class TokenizedDataset:
    """One split, tokenized: memory-mapped examples grouped into rows.

    Attributes:
      split: ``train``, ``validation`` or ``test``.
      tokens: int32 [total] all example tokens, concatenated (memory-mapped).
      mask: uint8 [total], 1 where the token is a trained target.
      offsets: int64 [N + 1]; example ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``.
      labels: int32 [N] class ids (classification) or None.
      label_names: class names in id order (classification) or None.
      hashes: uint64 [N] hash of each example's untruncated tokens.
      full_lengths: int32 [N] token count before truncation.
      paired: preference pairs: examples ``2k`` (chosen) and ``2k + 1`` (rejected) are
        row ``k``, and a batch holds each row as two lines (see :func:`collate`).
      row_offsets, row_examples: row ``r`` holds examples
        ``row_examples[row_offsets[r]:row_offsets[r + 1]]`` (one per row unless packed
        or paired).
      row_lengths: int64 [R] tokens a row needs on one batch line (the longer side of a
        pair).
      ref_logps: float32 [N] reference log-probabilities of the examples' completions when
        a preference task precomputed them (batches then carry ``ref_logps``), else None.
      seq_len: the longest a row can be.
      pad_id: id written into padding positions (masks, not ids, mark padding).
      stats: JSON-able build statistics (see :func:`build_datasets`).
      fingerprint: the cache key; the iterator checks it on resume.
      source_paths, held_out: where the examples came from (for the report).
    """

    def __init__(self, path: Path, cfg: DataConfig, pad_id: int):
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        self.split: str = meta["split"]
        self.seq_len: int = meta["seq_len"]
        self.fingerprint: str = meta["fingerprint"]
        self.label_names: list[str] | None = meta["label_names"]
        self.stats: dict[str, Any] = meta["stats"]
        self.source_paths: list[str] = meta["paths"]
        self.held_out: str | None = meta["held_out"]
        self.offsets = np.load(self.path / "offsets.npy")
        total = int(self.offsets[-1])
        self.tokens = self._memmap("tokens.bin", np.int32, total)
        self.mask = self._memmap("mask.bin", np.uint8, total)
        labels = np.load(self.path / "labels.npy")
        self.labels = labels if self.label_names is not None else None
        self.hashes = np.load(self.path / "hashes.npy")
        self.full_lengths = np.load(self.path / "full_lengths.npy")
        self.pad_id = int(pad_id)
        self.pad_to_multiple_of = cfg.pad_to_multiple_of
        self.length_buckets = tuple(cfg.length_buckets)
        self.packed = bool(cfg.packing)
        self.paired = bool(meta.get("paired", False))
        self.ref_logps: np.ndarray | None = None
        lengths = self.lengths
        if self.paired:
            self.row_offsets = np.arange(0, len(lengths) + 1, 2, dtype=np.int64)
            self.row_examples = np.arange(len(lengths), dtype=np.int64)
        elif self.packed:
            self.row_offsets, self.row_examples = pack_lengths(lengths, self.seq_len)
        else:
            self.row_offsets = np.arange(len(lengths) + 1, dtype=np.int64)
            self.row_examples = np.arange(len(lengths), dtype=np.int64)
        per_example = lengths[self.row_examples]
        if self.paired:  # the two sides sit on separate batch lines
            self.row_lengths = per_example.reshape(-1, 2).max(axis=1)
        else:
            self.row_lengths = (
                np.add.reduceat(per_example, self.row_offsets[:-1])
                if len(per_example)
                else np.zeros(0, dtype=np.int64)
            )

    def _memmap(self, name: str, dtype, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.path / name, dtype=dtype, mode="r", shape=(count,))

    @property
    def lengths(self) -> np.ndarray:
        """int64 [N] example lengths after truncation."""
        return np.diff(self.offsets)

    @property
    def num_examples(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        """Number of rows (what the batch iterator shuffles and batches)."""
        return len(self.row_offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32 [L], mask uint8 [L])`` of example ``i``."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return np.asarray(self.tokens[a:b]), np.asarray(self.mask[a:b])

    def use_rows(self, examples: np.ndarray, tag: str) -> None:
        """Makes row ``r`` the example ``examples[r]`` (repeats allowed): the train split
        resampled by ``data.balance``. ``tag`` joins the fingerprint, so an iterator
        position saved over other rows is refused on resume."""
        examples = np.asarray(examples, np.int64)
        self.row_offsets = np.arange(len(examples) + 1, dtype=np.int64)
        self.row_examples = examples
        self.row_lengths = self.lengths[examples]
        self.fingerprint = f"{self.fingerprint}+{tag}"

    def padded_length(self, n: int) -> int:
        """Batch length T for a longest row of ``n`` tokens (multiple of 8 or a bucket)."""
        return padded_length(n, self.pad_to_multiple_of, self.length_buckets)


class _Writer:
    """Appends examples to flat files in a directory, without holding them in memory."""

    def __init__(self, path: Path):
        self.path = path
        self._tokens = open(path / "tokens.bin", "wb")
        self._mask = open(path / "mask.bin", "wb")
        self._buf_ids: list[int] = []
        self._buf_mask: list[int] = []
        self.offsets = array.array("q", [0])
        self.labels = array.array("i")
        self.hashes = array.array("Q")
        self.full_lengths = array.array("i")

    def add(self, ids: list[int], mask: list[int], label: int, digest: int, full: int) -> None:
        self._buf_ids.extend(ids)
        self._buf_mask.extend(mask)
        self.offsets.append(self.offsets[-1] + len(ids))
        self.labels.append(label)
        self.hashes.append(digest)
        self.full_lengths.append(full)
        if len(self._buf_ids) >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        np.asarray(self._buf_ids, dtype=np.int32).tofile(self._tokens)
        np.asarray(self._buf_mask, dtype=np.uint8).tofile(self._mask)
        self._buf_ids, self._buf_mask = [], []

    def close(self) -> None:
        self._flush()
        self._tokens.close()
        self._mask.close()
        np.save(self.path / "offsets.npy", np.frombuffer(self.offsets, dtype=np.int64))
        np.save(self.path / "labels.npy", np.frombuffer(self.labels, dtype=np.int32))
        np.save(self.path / "hashes.npy", np.frombuffer(self.hashes, dtype=np.uint64))
        np.save(self.path / "full_lengths.npy", np.frombuffer(self.full_lengths, dtype=np.int32))


class _Builder:
    """Streams one split's records through the encoder into a cache directory."""

    def __init__(self, cfg: DataConfig, encoder, seq_len: int, writer: _Writer):
        self.cfg, self.encoder, self.seq_len, self.writer = cfg, encoder, seq_len, writer
        self.skipped: Counter = Counter()
        self.skip_messages: list[str] = []
        self.records = self.truncated = self.documents = 0
        self.pairs = {"pairs": 0, "truncated_pairs": 0, "identical_pairs": 0}
        self.label_counts: Counter = Counter()
        self._carry: list[int] = []  # text format: tokens not yet in a full chunk

    def reject(self, err: RowError) -> None:
        if not self.cfg.skip_invalid:
            raise err
        self.skipped[err.reason] += 1
        if len(self.skip_messages) < MAX_SKIP_MESSAGES:
            self.skip_messages.append(str(err))

    def run(self, source: SplitSource) -> None:
        batch = []
        for rec in source:
            self.records += 1
            if rec.error is not None:
                self.reject(rec.error)
            else:
                batch.append(rec)
            if len(batch) >= ENCODE_BATCH:
                self._encode(batch)
                batch = []
        self._encode(batch)
        if len(self._carry) >= 2:  # a 1-token tail has no target to train on
            self.writer.add(
                self._carry,
                [1] * len(self._carry),
                -1,
                _example_hash(self._carry),
                len(self._carry),
            )

    def _encode(self, batch) -> None:
        if not batch:
            return
        for rec, enc in zip(batch, self.encoder.encode_batch(batch), strict=True):
            if isinstance(enc, RowError):
                self.reject(enc)
            elif self.cfg.format == "text":
                self._chunk(enc)
            elif isinstance(enc, Pair):
                self._add_pair(enc)
            else:
                try:
                    self._add(rec.source, enc)
                except RowError as e:
                    self.reject(e)

    def _chunk(self, enc: Encoded) -> None:
        """Text: documents are concatenated and cut into seq_len-token examples."""
        self.documents += enc.doc_end
        self._carry.extend(enc.ids)
        n, start = self.seq_len, 0
        while len(self._carry) - start >= n:
            chunk = self._carry[start : start + n]
            self.writer.add(chunk, [1] * n, -1, _example_hash(chunk), n)
            start += n
        del self._carry[:start]

    def _add_pair(self, pair: Pair) -> None:
        """Preference: the chosen and the rejected side as two consecutive examples."""
        # The tokenizer's BOS survives truncation of the prompt's start.
        sides, cut = pair_examples(pair, self.seq_len, keep_head=len(self.encoder.bos))
        self.pairs["pairs"] += 1
        self.pairs["truncated_pairs"] += cut
        self.pairs["identical_pairs"] += pair.chosen == pair.rejected
        for ids, mask, full in sides:
            self.truncated += len(full) > len(ids)
            self.writer.add(ids, mask, -1, _example_hash(full), len(full))

    def _add(self, source: str, enc: Encoded) -> None:
        ids, mask, n = enc.ids, enc.mask, len(enc.ids)
        trains = self.cfg.format != "classification"
        if trains and not any(mask[1:]):
            raise RowError(source, "empty loss mask", "empty loss mask: nothing to train on")
        digest = _example_hash(ids)
        if n > self.seq_len:
            self.truncated += 1
            keep = (
                slice(None, self.seq_len)
                if self.cfg.truncation_side == "right"
                else slice(-self.seq_len, None)
            )
            ids, mask = ids[keep], mask[keep]
            if trains and not any(mask[1:]):
                raise RowError(
                    source,
                    "empty loss mask after truncation",
                    f"empty loss mask after truncating {n} tokens to seq_len={self.seq_len} "
                    f"({self.cfg.truncation_side} side); raise train.seq_len, set "
                    "data.truncation_side=left, or data.skip_invalid=true",
                )
        if enc.label >= 0:
            self.label_counts[enc.label] += 1
        self.writer.add(ids, mask, enc.label, digest, n)

    def stats(self, label_names: list[str] | None) -> dict[str, Any]:
        enc_stats = self.encoder.stats
        out: dict[str, Any] = {
            "records": self.records,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(self.skipped),
            "skipped_examples": self.skip_messages,
            "truncated": self.truncated,
            "missing_fields": dict(enc_stats["missing_fields"]),
            "empty_fields": dict(enc_stats["empty_fields"]),
        }
        if self.cfg.format == "text":
            out["documents"] = self.documents
        if self.cfg.format == "preference":
            out.update(self.pairs)
        if label_names is not None:
            out["label_counts"] = {
                label_names[k]: self.label_counts.get(k, 0) for k in range(len(label_names))
            }
        return out


def _cache_key(
    cfg: DataConfig, source: SplitSource, tokenizer, seq_len: int, label_names, cache_dir: Path
) -> str:
    keep = source.keep
    key = {
        "version": CACHE_VERSION,
        "split": source.split,
        "files": hash_files(source.paths, cache_dir),
        "dict_split": source.dict_split,
        "keep": hashlib.sha256(np.packbits(keep).tobytes()).hexdigest()
        if keep is not None
        else None,
        "max_examples": cfg.max_examples,
        "fraction": source.fraction,
        "max_examples_seed": cfg.split_seed if cfg.max_examples or source.fraction < 1 else None,
        "format": cfg.format,
        "fields": sorted(cfg.fields.items()),
        "template": cfg.template,
        "system_prompt": cfg.system_prompt,
        "train_on_inputs": cfg.train_on_inputs,
        "add_eos": cfg.add_eos,
        "truncation_side": cfg.truncation_side,
        "skip_invalid": cfg.skip_invalid,
        "label_names": label_names,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seq_len": seq_len,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else EOS, else 0. Only fills padding: masks mark it."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def build_split(
    cfg: DataConfig,
    tokenizer,
    seq_len: int,
    source: SplitSource,
    label_names: list[str] | None = None,
    use_cache: bool = True,
) -> TokenizedDataset:
    """Tokenizes one split (or opens its cache entry).

    Raises:
      DataError: a bad row (unless ``data.skip_invalid``) or a split with no usable example.
    """
    if cfg.truncation_side not in ("right", "left"):
        raise DataError(f"data.truncation_side = {cfg.truncation_side!r}; expected right or left")
    if seq_len < 2:
        raise DataError(f"seq_len = {seq_len}; expected at least 2")
    cache_dir = default_cache_dir(cfg)
    key = _cache_key(cfg, source, tokenizer, seq_len, label_names, cache_dir)
    final = cache_dir / f"{source.split}-{key}"
    if use_cache and (final / "meta.json").exists():
        ds = TokenizedDataset(final, cfg, _pad_id(tokenizer))
        # Keyed by content, maybe built from a copy elsewhere: name this config's files.
        ds.source_paths, ds.held_out = [str(p) for p in source.paths], source.held_out
        return ds
    # A rebuild (use_cache off) replaces the entry; else a concurrent build's entry wins.
    with cache_entry(final, replace=not use_cache) as tmp:
        writer = _Writer(tmp)
        builder = _Builder(cfg, make_encoder(cfg, tokenizer, label_names), seq_len, writer)
        builder.run(source)
        writer.close()
        n = len(writer.offsets) - 1
        if n == 0:
            reasons = ", ".join(f"{k}: {v}" for k, v in builder.skipped.items()) or "none"
            raise DataError(
                f"data.{source.split}: no usable examples ({builder.records} rows read; "
                f"skipped {sum(builder.skipped.values())} ({reasons}))"
            )
        meta = {
            "split": source.split,
            "seq_len": seq_len,
            "fingerprint": key,
            "label_names": label_names,
            "stats": builder.stats(label_names),
            "paths": [str(p) for p in source.paths],
            "held_out": source.held_out,
            "paired": cfg.format == "preference",
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return TokenizedDataset(final, cfg, _pad_id(tokenizer))


def build_datasets(
    cfg: DataConfig,
    tokenizer,
    seq_len: int,
    splits: tuple[str, ...] = SPLITS,
    use_cache: bool = True,
) -> dict[str, TokenizedDataset]:
    """Loads, tokenizes (cached), packs and pads-plans every split that has data.

    Args:
      cfg: the ``data`` config section.
      tokenizer: a Hugging Face tokenizer (fast or sentencepiece-based).
      seq_len: longest row in tokens; longer examples are truncated (and counted).
      splits: which splits to build, among ``train``, ``validation``, ``test``.
      use_cache: reuse a cache entry with the same key; False rebuilds and replaces it.

    Returns:
      ``{split: TokenizedDataset}`` for the splits that have data. Each ``stats`` dict
      holds ``records``, ``skipped`` (+ ``skipped_by_reason``, ``skipped_examples``),
      ``truncated``, ``missing_fields``, ``empty_fields``, ``label_counts``
      (classification), ``documents`` (text), ``examples``, ``rows``, ``tokens``,
      ``trained_tokens``, ``duplicates`` (examples whose tokens repeat an earlier
      example in the split) and ``overlap`` (``{other split: examples also there}``);
      with ``data.balance`` the train split's rows are resampled and its stats hold
      ``balance`` (:func:`jaxtune.data.balance.apply_balance`).

    Raises:
      DataError: bad files or rows (one line, naming file, line and field).
    """
    check_balance(cfg)
    sources = {s: src for s in splits if (src := load_split(cfg, s)) is not None}
    if not sources:
        raise DataError("data.train is not set; expected a data file, glob or directory")
    if cfg.packing and cfg.format in ("classification", "preference"):
        raise DataError(f"data.packing is not supported with data.format={cfg.format}")
    label_names = resolve_label_names(cfg, sources)
    out = {
        s: build_split(cfg, tokenizer, seq_len, src, label_names, use_cache)
        for s, src in sources.items()
    }
    uniques = {s: np.unique(ds.hashes) for s, ds in out.items()}
    for s, ds in out.items():
        ds.stats.update(
            examples=ds.num_examples,
            rows=len(ds),
            tokens=int(ds.offsets[-1]),
            trained_tokens=int(np.count_nonzero(ds.mask)) - _first_token_trained(ds),
            duplicates=int(ds.num_examples - len(uniques[s])),
            overlap={o: int(np.isin(ds.hashes, uniques[o]).sum()) for o in out if o != s},
        )
    apply_balance(cfg, out)  # after the stats above: they describe the examples as read
    return out


def _first_token_trained(ds: TokenizedDataset) -> int:
    """Mask bits on each example's first token, which is never a target (not counted)."""
    if ds.num_examples == 0:
        return 0
    return int(np.count_nonzero(np.asarray(ds.mask)[ds.offsets[:-1]]))
