"""The ``jaxtune plan`` subcommand (parser + runner), kept beside the code it drives.

``jaxtune.cli`` wires it in with ``add_plan_parser(subparsers, make_sub)`` and
``COMMANDS["plan"] = run_plan``. Exit codes: 0 the step fits (or no limit is known),
1 it does not fit, 2 bad config / topology.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

EXAMPLE = "jaxtune plan configs/llama31_8b_lora.yaml --topology v5p:2x2x2"


def add_plan_parser(subparsers, make_sub):
    """Adds ``plan`` to ``subparsers``; ``make_sub(subparsers, name, help, description)``."""
    p = make_sub(
        subparsers,
        "plan",
        "AOT-compile the train step for a TPU topology or N devices; memory and FLOPs",
        "Compile the exact train step of a config for a TPU pod slice on this host "
        "(no TPU needed; needs libtpu: pip install 'jax[tpu]') or for N local devices, "
        "without loading weights, and print per-device memory (arguments, outputs, "
        "temporaries, total vs HBM), FLOPs per step and whether it fits. Exit code 1 "
        "if it does not fit.\n\nexample:\n  " + EXAMPLE,
    )
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=16")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--topology", metavar="GEN:AxBxC", help="TPU slice, e.g. v5p:2x2x2, v5e:4x4, v6e:2x4"
    )
    where.add_argument(
        "--devices", type=int, metavar="N", help="the first N devices of the local platform"
    )
    p.add_argument(
        "--preset",
        help="architecture preset (e.g. llama31_8b) instead of model.path / model.preset",
    )
    p.add_argument(
        "--hbm-gib", type=float, metavar="GIB", help="memory per device to check against"
    )
    p.add_argument(
        "--measure",
        type=int,
        default=0,
        metavar="STEPS",
        help="also run the compiled step STEPS times on the local devices with made-up "
        "weights and batch (no checkpoint or data needed): seconds/step, tokens/s, MFU "
        "and the allocator's peak memory (GPU/TPU). Needs --devices",
    )
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    return p


def run_plan(args) -> int:
    """Runs ``jaxtune plan``; returns the exit code (0 fits, 1 does not fit)."""
    from jaxtune.config import load_config
    from jaxtune.train.plan import format_plan, local_devices, plan, topology_devices

    if args.measure < 0 or (args.measure and args.topology):
        from jaxtune.errors import ConfigError

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
