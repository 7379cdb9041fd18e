"""Data: files -> rows -> token ids + loss masks -> packed, padded, sharded batches.

Entry points::

    from jaxtune.data import build_datasets, BatchIterator, inspect_data

    datasets = build_datasets(cfg.data, tokenizer, seq_len)   # {"train": TokenizedDataset, ...}
    it = BatchIterator(datasets["train"], batch_size=8, seed=run_seed,
                       process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)               # dict of numpy arrays (below)
    ckpt["data"] = it.state()      # small JSON-able dict
    it = BatchIterator.from_state(datasets["train"], ckpt["data"], process_index=..., ...)
    inspect_data(cfg.data, tokenizer, seq_len, out_dir)   # report.json / report.md / lengths.png

Batch contract (numpy; B = global batch / process_count rows on this host, T = the
longest row of the global batch rounded up to ``data.pad_to_multiple_of`` or the smallest
``data.length_buckets`` entry that fits, so T takes a bounded set of values):

* ``input_ids`` int32 [B, T]: tokens; padding positions hold the pad id (the tokenizer's
  pad token, else EOS, else 0). Padding is marked by the masks below, never by the id, so
  an EOS used as pad is still trained where it ends a response.
* ``targets`` int32 [B, T]: ``input_ids`` shifted left by one *within each example*; at an
  example's last token and on padding it holds the pad id (weight 0 there).
* ``loss_weights`` float32 [B, T]: 1.0 where ``targets[t]`` is trained: response tokens and
  the closing EOS for instruction/chat/completion (every token with
  ``data.train_on_inputs``), every token for text, none for classification. Never across a
  packed segment boundary, never on padding.
* ``attention_mask`` int32 [B, T]: 1 on real tokens, 0 on padding.
* ``positions`` int32 [B, T]: position within the token's own example (restarts at 0 in
  each packed segment; 0 on padding).
* ``segment_ids`` int32 [B, T]: 1, 2, ... per example in the row, 0 on padding. Attention
  must stay within equal nonzero segment ids.
* ``labels`` int32 [B] (classification only): class id, -1 on an empty padding row. Label
  names in id order: ``dataset.label_names``.

An empty padding row (all masks 0) only appears with ``drop_remainder=False``.

Preference data (``data.format: preference``) batches B pairs as 2B lines: pair ``k`` is
line ``2k`` (chosen) and ``2k + 1`` (rejected), each prompt + completion with
``loss_weights`` on the completion only (:mod:`jaxtune.data.preference`).
"""

from jaxtune.data.config import FORMATS, DataConfig
from jaxtune.data.encoding import Encoded
from jaxtune.data.formats import TEMPLATES, make_encoder
from jaxtune.data.iterator import BatchIterator, padding_fraction
from jaxtune.data.loaders import Record, RowError
from jaxtune.data.packing import collate, pack_lengths, padded_length
from jaxtune.data.report import format_console, inspect_data
from jaxtune.data.splits import SPLITS, SplitSource, load_split
from jaxtune.data.tokenized import TokenizedDataset, build_datasets, build_split

__all__ = [
    "FORMATS",
    "SPLITS",
    "TEMPLATES",
    "BatchIterator",
    "DataConfig",
    "Encoded",
    "Record",
    "RowError",
    "SplitSource",
    "TokenizedDataset",
    "build_datasets",
    "build_split",
    "collate",
    "format_console",
    "inspect_data",
    "load_split",
    "make_encoder",
    "pack_lengths",
    "padded_length",
    "padding_fraction",
]
