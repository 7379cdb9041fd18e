"""``jaxtune convert``: HF safetensors directory or .gguf file -> jaxtune checkpoint."""

from __future__ import annotations

import time

from jaxtune.api import convert


def run(args) -> int:
    t0 = time.perf_counter()
    out = convert(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote jaxtune checkpoint {out} ({time.perf_counter() - t0:.1f}s)")
    return 0
