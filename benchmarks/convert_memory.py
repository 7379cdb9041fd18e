"""Peak host memory of `jaxtune convert` on the real SmolLM2 GGUF.

Prints a table: peak RSS of the convert process, the RSS of a process that only imports
what convert imports (the interpreter + jax + transformers baseline), and both against
the fp32 model size. Conversion streams tensors, so peak - baseline should stay well
under 1.5x the fp32 model.

    python benchmarks/convert_memory.py
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxtune.resources import SMOLLM2_GGUF, resolve_path

IMPORTS = (
    "import jax, jax.numpy as jnp, orbax.checkpoint, transformers, gguf, jaxtune.api, jaxtune.hf.io, "
    "jaxtune.gguf.load; from transformers import PreTrainedTokenizerFast; jnp.zeros(1).block_until_ready()"
)


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """Runs cmd in a child; returns (peak RSS in MiB, seconds). One child per call."""
    t0 = time.perf_counter()
    # ru_maxrss of RUSAGE_CHILDREN is the max over waited-for children: run each
    # measurement in a fresh wrapper process so the numbers do not mix.
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    # CPU only: an installed libtpu would otherwise add its own ~225 MiB to both numbers.
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return int(out.stdout.strip().splitlines()[-1]) / 1024, time.perf_counter() - t0


def main() -> None:
    src = resolve_path(SMOLLM2_GGUF)
    from jaxtune.gguf.load import read_gguf_config

    cfg = read_gguf_config(src)
    h, f, v, n = (
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["vocab_size"],
        cfg["num_hidden_layers"],
    )
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    params = v * h + n * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h) + h
    fp32_mb = params * 4 / 2**20
    base_mb, _ = peak_rss_mb([sys.executable, "-c", IMPORTS])
    with tempfile.TemporaryDirectory() as tmp:
        conv_mb, secs = peak_rss_mb(
            [sys.executable, "-m", "jaxtune", "convert", str(src), str(Path(tmp) / "ckpt")]
        )
    rows = [
        ("fp32 model size", fp32_mb, 1.0),
        ("baseline (imports only)", base_mb, base_mb / fp32_mb),
        ("convert peak RSS", conv_mb, conv_mb / fp32_mb),
        ("convert peak - baseline", conv_mb - base_mb, (conv_mb - base_mb) / fp32_mb),
    ]
    print(f"jaxtune convert {src.name} ({params / 1e6:.1f}M params) in {secs:.1f}s")
    print(f"| {'what':<26} | {'MiB':>8} | {'x fp32 model':>12} |")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 14}|")
    for name, mb, ratio in rows:
        print(f"| {name:<26} | {mb:>8.0f} | {ratio:>12.2f} |")
    _ = resource  # the wrapper uses resource in the child


if __name__ == "__main__":
    main()
