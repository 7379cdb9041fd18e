"""The ``data`` section of a run config (schema only; loading lives in ``jaxtune.config``)."""

from __future__ import annotations

from dataclasses import dataclass, field

FORMATS = ("instruction", "chat", "completion", "text", "classification", "preference")
BALANCE = ("none", "oversample", "undersample", "weight")


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it becomes token batches.

    Attributes:
      train: file (jsonl/json/csv/parquet/txt), glob, or saved ``datasets`` directory.
      validation: same, optional. When absent, ``validation_fraction`` of train is held out.
      test: same, optional. When absent, ``test_fraction`` of train is held out.
      split: for a saved ``DatasetDict`` directory, which split to read for ``train``.
      format: one of ``FORMATS``.
      fields: canonical field name -> column name in the file, e.g. ``{output: answer}``.
      template: instruction prompt template: a built-in name (``alpaca``, ``plain``) or a
        custom string with ``{instruction}`` and optional ``{input}`` placeholders.
      system_prompt: system message prepended for chat-rendered examples.
      train_on_inputs: also put loss on prompt tokens (default: completion only).
      add_eos: append the tokenizer's EOS to every response / document.
      packing: pack several examples per row (segment ids + per-segment positions).
      pad_to_multiple_of: right-pad rows to a multiple of this (bounded recompiles).
      length_buckets: optional fixed row lengths; a row is padded to the smallest bucket
        that fits. Overrides ``pad_to_multiple_of`` when set.
      truncation_side: ``right`` (drop the end) or ``left`` (drop the start).
      validation_fraction: fraction of train held out as validation when no file is given.
      test_fraction: fraction of train held out as test when no file is given.
      split_seed: seed of the deterministic train/validation/test split and of the
        ``max_examples`` subset.
      shuffle: shuffle training order each epoch (a function of seed and epoch).
      skip_invalid: skip (and count) bad rows instead of failing on the first one.
      labels: classification label names in id order; empty = sorted unique labels.
      max_examples: cap on examples per split (quick experiments, data-size sweeps): the
        first ``max_examples`` of one permutation seeded by ``split_seed``, so a smaller
        cap's examples are inside a larger cap's.
      train_fraction: share of the train split's examples used, the first
        ``round(n * train_fraction)`` of that same permutation (with ``max_examples``, the
        smaller of the two). Unlike ``max_examples`` it leaves validation and test alone,
        so a data-size sweep evaluates every size on the same examples.
      cache_dir: where tokenized data is cached; default ``~/.cache/jaxtune/data``.
      balance: class balance of a classification train split (``data.format:
        classification`` only), one of ``BALANCE``. ``oversample`` repeats each smaller
        class's examples (whole copies, then a seeded random remainder) up to the
        largest class's count; ``undersample`` keeps a seeded subset of each class down
        to the smallest class's count; both resample the train split only, after
        ``max_examples`` / ``train_fraction``, from ``split_seed``, and ``train.epochs``
        counts the resampled rows. ``weight`` weighs each example's loss by its class's
        inverse frequency ``n / (K * n_c)`` over the train split (scikit-learn's
        ``balanced``). Validation and test are never changed.
    """

    train: str | None = None
    validation: str | None = None
    test: str | None = None
    split: str | None = None
    format: str = "instruction"
    fields: dict[str, str] = field(default_factory=dict)
    template: str = "alpaca"
    system_prompt: str | None = None
    train_on_inputs: bool = False
    add_eos: bool = True
    packing: bool = False
    pad_to_multiple_of: int = 8
    length_buckets: tuple[int, ...] = ()
    truncation_side: str = "right"
    validation_fraction: float = 0.0
    test_fraction: float = 0.0
    split_seed: int = 0
    shuffle: bool = True
    skip_invalid: bool = False
    labels: tuple[str, ...] = ()
    max_examples: int | None = None
    train_fraction: float = 1.0
    cache_dir: str | None = None
    balance: str = "none"
