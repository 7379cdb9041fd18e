"""The CPU a benchmark ran on: model name, widest vector ISA, core count.

XLA and torch pick different kernels per ISA (AVX2 vs AVX-512 vs AMX), so a speed
ratio means little without it; every benchmark result records this.
"""

from __future__ import annotations

import os
import platform


def cpu_info() -> dict:
    """``{"model", "isa", "flags", "cores"}``; isa is AMX, AVX-512, AVX2 or the arch name.

    From ``/proc/cpuinfo`` (Linux); elsewhere the model is ``platform.processor()``.
    """
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if {"amx_tile", "amx_bf16"} <= flags:
        isa = "AMX"
    elif "avx512f" in flags:
        isa = "AVX-512"
    elif "avx2" in flags:
        isa = "AVX2"
    else:
        isa = platform.machine()
    extras = sorted(f for f in flags if f.startswith(("avx512", "amx")) and f != "avx512f")
    return {"model": model, "isa": isa, "flags": extras, "cores": len(os.sched_getaffinity(0))}


if __name__ == "__main__":
    print(cpu_info())
