"""``jaxtune data inspect``: a data report (examples, token counts, truncation, balance).

With ``eval.tasks`` in the config, the report also lists the evaluation items that share a
13-gram with the training data (``perplexity`` is not an item task and is skipped;
``eval.max_items`` caps the items checked, as it caps the items scored).

``jaxtune data generate`` runs :mod:`jaxtune.cli.data_generate`.
"""

from __future__ import annotations

from pathlib import Path

from jaxtune.cli import data_generate
from jaxtune.config import load_config
from jaxtune.data import inspect_data
from jaxtune.eval.contamination import tasks_texts
from jaxtune.loading import load_tokenizer
from jaxtune.train.run_dir import output_dir


def run(args) -> int:
    if args.action == "generate":
        return data_generate.run(args)
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.run.dir) / "data_report"
    tok = load_tokenizer(cfg.model.path)
    # Loaded before the output directory exists: a bad task name leaves nothing behind.
    eval_items = tasks_texts(cfg.eval.tasks, limit=cfg.eval.max_items) if cfg.eval.tasks else None
    # The default report goes into run.dir, marked as a jaxtune run directory so a later
    # `jaxtune train` starts there; a failure leaves no directory behind.
    with output_dir(out, run_dir=None if args.out else cfg.run.dir):
        inspect_data(
            cfg.data,
            tok,
            cfg.train.seq_len,
            out,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            eval_items=eval_items,
        )
    print(f"report written to {out}")
    return 0
