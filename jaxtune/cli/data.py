"""``jaxtune data inspect``: a data report (examples, token counts, truncation, balance)."""

from __future__ import annotations

from pathlib import Path

from jaxtune.config import load_config
from jaxtune.data import inspect_data
from jaxtune.loading import load_tokenizer
from jaxtune.train.run_dir import output_dir


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.run.dir) / "data_report"
    tok = load_tokenizer(cfg.model.path)
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
        )
    print(f"report written to {out}")
    return 0
