"""``jaxtune plan``: AOT-compile the train step for a TPU topology or N local devices.

Exit codes: 0 the step fits (or no limit is known), 1 it does not fit, 2 bad config /
topology.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxtune.config import load_config
from jaxtune.errors import ConfigError
from jaxtune.train.plan import format_plan, local_devices, plan, topology_devices


def run(args) -> int:
    if args.measure < 0 or (args.measure and args.topology):
        raise ConfigError(
            "--measure: expected a number of steps >= 1 with --devices (a --topology "
            "describes chips this host does not have)"
        )
    cfg = load_config(args.config, args.overrides)
    if args.topology:
        devices, target = topology_devices(args.topology), args.topology
    else:
        devices = local_devices(args.devices)
        target = f"--devices {args.devices}"
    hbm = None if args.hbm_gib is None else int(args.hbm_gib * 1024**3)
    result = plan(
        cfg, devices, target=target, preset=args.preset, hbm_bytes=hbm, measure=args.measure
    )
    print(format_plan(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=2))
    if result.fits is False:
        print(
            f"error: the train step does not fit in {target} memory (see above)",
            file=sys.stderr,
        )
        return 1
    return 0
