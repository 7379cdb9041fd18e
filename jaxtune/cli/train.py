"""``jaxtune train``: fine-tune from a config (a re-run with the same run.dir resumes)."""

from __future__ import annotations

from jaxtune.config import load_config
from jaxtune.train.distributed import initialize_from_args
from jaxtune.train.loop import train


def run(args) -> int:
    initialize_from_args(args)
    cfg = load_config(args.config, args.overrides)
    out = train(cfg)
    print(
        f"run dir: {out['run_dir']} "
        f"({out['steps']} steps, {out['seconds']:.0f}s, {out['stop_reason']})"
    )
    return 0
