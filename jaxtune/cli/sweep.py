"""``jaxtune sweep``: a grid or random sample of runs of one config (see
:mod:`jaxtune.train.sweep`), or ``--collect OUT`` to merge the shards of one."""

from __future__ import annotations

from pathlib import Path

from jaxtune.errors import ConfigError
from jaxtune.train.sweep import sweep
from jaxtune.train.sweep_results import DEFAULT_METRIC, collect


def run(args) -> int:
    if args.collect is not None:
        given = [
            flag
            for flag, v in (
                ("CONFIG", args.config),
                ("--grid", args.grid),
                ("--random", args.random),
                ("--shard", args.shard),
                ("--out", args.out),
            )
            if v
        ]
        if given:
            raise ConfigError(f"--collect OUT merges a finished sweep; drop {', '.join(given)}")
        result = collect(args.collect, args.metric, args.mode)
    else:
        if not args.config:
            raise ConfigError("expected a CONFIG to sweep (or --collect OUT)")
        out = args.out or f"runs/sweep_{Path(args.config).stem}"
        result = sweep(
            args.config,
            args.grid,
            out=out,
            overrides=args.overrides or [],
            random=args.random,
            seed=args.seed,
            metric=args.metric or DEFAULT_METRIC,
            mode=args.mode,
            shard=args.shard,
        )
    statuses = [r["status"] for r in result["rows"]]
    done = sum(s in ("completed", "early stopped") for s in statuses)
    print(f"{done}/{len(statuses)} runs finished; results in {result['files'][0]}")
    if result["best"]:
        print(f"best run: {result['best']}")
    return 0 if done == len(statuses) else 1
