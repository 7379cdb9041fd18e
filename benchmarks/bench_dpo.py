"""DPO training throughput, jaxtune vs TRL's ``DPOTrainer`` (transformers + PEFT), CPU.

Same bench-tiny Llama (``bench_train.py``'s seeded weights), LoRA r=8 / alpha 16 on
all linear layers, no dropout, the same pairs (random ids, no padding), beta 0.1
sigmoid loss, AdamW after clipping at 1.0, float32, reference = the policy with its
adapter off on both sides. Each side in its own process (``dpo_workers.py``); after
warmup, ``--pairs`` interleaved rounds of ``--steps`` timed steps; ratio = jaxtune
tokens/s over TRL's per round, median (min-max). Needs TRL (``pip install -e ".[bench]"``)::

    python benchmarks/bench_dpo.py [--pairs 5] [--steps 2] [--batch 4] [--seq 256] \\
        [--prompt 128] [--out benchmarks/results/dpo_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_train import OPTIM, TINY, Worker, log, write_tiny  # noqa: E402
from cpu_info import cpu_info  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens of each pair")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--scratch", default="/tmp/scratch/bench")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    scratch = Path(args.scratch) / f"dpo_{os.getpid()}"
    model_path = str(write_tiny(scratch / "bench-tiny", 0, dict(TINY)))
    spec = {"model_path": model_path, "batch": args.batch, "seq": args.seq,
            "prompt": args.prompt, "vocab": TINY["vocab_size"], "seed": 0, "rank": 8,
            "alpha": 16, "beta": 0.1, "optim": OPTIM, "warmup": args.warmup,
            "threads": args.threads, "scratch": str(scratch)}  # fmt: skip
    workers = []
    for label, side in (("jaxtune", "jax"), ("TRL DPOTrainer", "trl")):
        log(f"starting {label} ...")
        w = Worker(label, side, spec, script="dpo_workers.py")
        log(f"{label}: load {w.ready['load_s']:.1f}s, first step {w.ready['first_step_s']:.2f}s, "
            f"loss {w.ready['first_loss']:.5f}")  # fmt: skip
        workers.append(w)
    jax_w, trl_w = workers
    ratios, t0 = [], time.perf_counter()
    for i in range(args.pairs):
        order = (jax_w, trl_w) if i % 2 == 0 else (trl_w, jax_w)
        times = {w.name: w.run(args.steps)[0] for w in order}
        ratios.append(times["TRL DPOTrainer"] / times["jaxtune"])
        log(f"pair {i + 1}/{args.pairs}: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()))
    fins = {w.name: w.finish() for w in workers}
    tokens = 2 * args.batch * args.seq
    cpu = cpu_info()
    rows = []
    for w in workers:
        med = statistics.median(w.times)
        rows.append({"side": w.name, "step_s": med, "tok_s": tokens / med,
                     "cpu_s": statistics.median(w.cpu), "first_loss": w.losses[0],
                     "last_loss": w.losses[-1], "peak_rss_mib": fins[w.name]["peak_rss_kib"] // 1024,
                     "trainable": w.ready["trainable"]})  # fmt: skip
    print(
        f"CPU: {cpu['model']} ({cpu['isa']}), {cpu['cores']} cores, {args.threads} threads per side"
    )
    print(f"bench-tiny DPO (LoRA r=8, all linear), {args.batch} pairs x 2 x {args.seq} tokens "
          f"(prompt {args.prompt}), float32\n")  # fmt: skip
    print("| | " + " | ".join(r["side"] for r in rows) + " |\n|---|---|---|")
    print("| tokens/s (median step) | " + " | ".join(f"{r['tok_s']:.0f}" for r in rows) + " |")
    print(f"| ratio vs TRL, median (min-max of rounds) | **{statistics.median(ratios):.2f}x** "
          f"({min(ratios):.2f}-{max(ratios):.2f}) | 1 |")  # fmt: skip
    print("| step, s (median) | " + " | ".join(f"{r['step_s']:.3f}" for r in rows) + " |")
    print("| step CPU time, s | " + " | ".join(f"{r['cpu_s']:.2f}" for r in rows) + " |")
    print("| peak RSS, MiB | " + " | ".join(str(r["peak_rss_mib"]) for r in rows) + " |")
    print("| loss first -> last | " + " | ".join(
        f"{r['first_loss']:.5f} -> {r['last_loss']:.5f}" for r in rows) + " |")  # fmt: skip
    if args.out:
        meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu,
                "argv": ["python", "benchmarks/bench_dpo.py", *argv],
                "seconds": time.perf_counter() - t0}  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"meta": meta, "sides": rows, "ratios": ratios}, indent=2)
        )
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
