"""Where jaxtune's compiled training step spends its time on this machine (CPU).

Builds the step exactly as ``bench_train.py``'s jaxtune worker does (the step of
``jaxtune train``), runs it under ``jax.profiler``, and sums the XLA thunks' times from
the trace by HLO instruction and by kind (matmul, attention, copy/transpose, reduction,
elementwise, ...), each attributed to the JAX operation it came from::

    python benchmarks/profile_step.py [--model tiny] [--mode lora|full] [--steps 3]
        [--set model.attention=xla ...] [--top 25] [--out benchmarks/results/profile.md]

XLA's CPU runtime runs independent thunks concurrently, so each instant of wall time is
split among the thunks running then; the per-op times add up to the step's busy time. The compiled
HLO (``compiled.as_text()``) gives each instruction's opcode, the ops a fusion holds and
the JAX ``op_name`` in its metadata.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_train import OPTIM, TINY, variant, write_tiny  # noqa: E402
from cpu_info import cpu_info  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]+)"')
_SRC = re.compile(r'source_file="([^"]+)" source_line=(\d+)')
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


_TABLE_ROW = re.compile(r"^(\d+) (.*)$")


def _frames(text: str) -> dict[str, str]:
    """The HLO's stack-frame tables -> {stack_frame_id: "file.py:line"} (innermost frame)."""
    tables: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
            continue
        m = _TABLE_ROW.match(line) if current is not None else None
        if not m:
            current = (
                None
                if not line.strip() or line.startswith(("%", "ENTRY", "HloModule"))
                else current
            )
            continue
        current[m.group(1)] = m.group(2)
    files = {k: Path(v.strip('"')).name for k, v in tables.get("FileNames", {}).items()}
    locs = {}
    for k, v in tables.get("FileLocations", {}).items():
        f, ln = re.search(r"file_name_id=(\d+)", v), re.search(r"line=(\d+)", v)
        if f and ln:
            locs[k] = f"{files.get(f.group(1), '?')}:{ln.group(1)}"
    out = {}
    for k, v in tables.get("StackFrames", {}).items():
        loc = re.search(r"file_location_id=(\d+)", v)
        out[k] = locs.get(loc.group(1), "") if loc else ""
    return out


def parse_hlo(text: str) -> dict[str, dict]:
    """Compiled HLO text -> {instruction name: {"op", "ops" (inside a fusion), "jax", "src"}}."""
    frames = _frames(text)
    comps: dict[str, list[str]] = {}
    instrs: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("{")[0]:
            current = m.group(1)
            comps[current] = []
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op = m.groups()
        if current is not None:
            comps[current].append(op)
        calls = _CALLS.search(line)
        jax_op = _OPNAME.search(line)
        src = _SRC.search(line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        instrs[name] = {
            "op": op,
            "shape": re.sub(r"\{[^}]*\}", "", shape),
            "calls": calls.group(1) if calls else None,
            "jax": jax_op.group(1) if jax_op else "",
            "src": f"{Path(src.group(1)).name}:{src.group(2)}"
            if src
            else frames.get(frame.group(1), "")
            if frame
            else "",
        }
    for info in instrs.values():
        info["ops"] = set(comps.get(info["calls"], [])) if info["calls"] else {info["op"]}
    return instrs


def kind_of(name: str, info: dict | None) -> str:
    """A coarse kind for an HLO instruction (what a reader of the table needs)."""
    if info is None:
        return "ynn fusion (matmul)" if name.startswith("ynn_fusion") else "other"
    ops = info["ops"]
    if info["src"].startswith("attention.py"):
        return "attention"
    if ops & {"dot", "convolution"} or name.startswith("ynn_fusion") or "custom-call" in ops:
        return "matmul"
    if ops & {"dynamic-update-slice", "dynamic-slice"} and not ops - {
        "dynamic-update-slice", "dynamic-slice", "parameter", "bitcast", "constant", "tuple",
        "get-tuple-element", "copy",
    }:  # fmt: skip
        return "scan slicing"
    if ops & {"transpose", "copy"} and not ops & {"add", "multiply", "exp", "reduce"}:
        return "copy/transpose"
    if "reduce" in ops:
        return "reduction (+ fused elementwise)"
    if ops & {"rng-bit-generator", "rng"}:
        return "random"
    return "elementwise"


def load_trace(log_dir: Path) -> list[dict]:
    path = sorted(log_dir.glob("plugins/profile/*/*.trace.json.gz"))[-1]
    data = json.load(gzip.open(path))
    return data["traceEvents"] if isinstance(data, dict) else data


def summarize(events: list[dict], hlo: dict[str, dict], module: str, steps: int) -> dict:
    """Per-instruction and per-kind wall time (ms per step) of one HLO module's thunks."""
    spans = []
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") != "X" or args.get("hlo_module") != module or "hlo_op" not in args:
            continue
        op = args["hlo_op"]
        if hlo.get(op, {}).get("op") in ("while", "call", "conditional"):
            continue  # containers: their bodies' thunks are counted themselves
        spans.append((e["ts"], e["ts"] + e["dur"], op))
    # Thunks run concurrently on XLA's threads; two sharing the cores each look slow.
    # Wall time is attributed by a sweep: each instant is split among the thunks running.
    by_op: dict[str, float] = collections.Counter()
    count: dict[str, int] = collections.Counter()
    edges = sorted([(a, 1, i) for i, (a, _, _) in enumerate(spans)]
                   + [(b, -1, i) for i, (_, b, _) in enumerate(spans)])  # fmt: skip
    active: set[int] = set()
    last = None
    for t, kind, i in edges:
        if active and last is not None:
            share = (t - last) / len(active) / 1e3 / steps
            for j in active:
                by_op[spans[j][2]] += share
        (active.add if kind == 1 else active.discard)(i)
        last = t
    for _, _, op in spans:
        count[op] += 1
    by_kind: dict[str, float] = collections.Counter()
    for op, ms in by_op.items():
        by_kind[kind_of(op, hlo.get(op))] += ms
    return {"by_op": by_op, "count": count, "by_kind": by_kind}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("tiny",), default="tiny")
    ap.add_argument("--mode", choices=("lora", "full"), default="lora")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warmup)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="jaxtune config override, e.g. model.attention=xla (repeatable)")  # fmt: skip
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--scratch", default="/tmp/scratch/bench")
    ap.add_argument("--out", help="also write the tables here (Markdown)")
    ap.add_argument("--hlo", help="also write the compiled HLO text here")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # As the `jaxtune` command does before jax starts (JAXTUNE_MALLOC=system: glibc's own).
    from jaxtune.malloc import keep_freed_memory

    keep_freed_memory()
    import jax
    from train_workers import JaxSide

    scratch = Path(args.scratch) / f"profile_{os.getpid()}"
    model_path = str(write_tiny(scratch / "bench-tiny", 0, dict(TINY)))
    overrides = variant("set:" + ",".join(args.set))[1] if args.set else {}
    spec = {"mode": args.mode, "model_path": model_path, "batch": args.batch, "seq": args.seq,
            "vocab": TINY["vocab_size"], "seed": 0, "rank": 8, "alpha": 16, "optim": OPTIM,
            "scan": True, "dtype": "float32", "scratch": str(scratch), "set": overrides}  # fmt: skip
    side = JaxSide(spec)
    compiled = side.step_fn.lower(side.state, side.frozen, side.to_device(side.batch)).compile()
    hlo = parse_hlo(compiled.as_text())
    if args.hlo:
        Path(args.hlo).write_text(compiled.as_text())
    module = compiled.as_text().split("\n", 1)[0].split()[1].rstrip(",")
    for _ in range(2):
        side.step()
    walls = []
    with tempfile.TemporaryDirectory() as log_dir:
        jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
        for _ in range(args.steps):
            t0 = time.perf_counter()
            side.step()
            walls.append(time.perf_counter() - t0)
        jax.profiler.stop_trace()
        events = load_trace(Path(log_dir))
    s = summarize(events, hlo, module, args.steps)
    wall_ms = 1e3 * sorted(walls)[len(walls) // 2]
    total = sum(s["by_op"].values())
    info = cpu_info()
    lines = [
        f"# Step profile: bench-{args.model} {args.mode}, batch {args.batch} x {args.seq}"
        + (f", {' '.join(args.set)}" if args.set else ""),
        "",
        f"CPU: {info['model']} ({info['isa']}), {info['cores']} cores; jax {jax.__version__}. "
        f"Step wall {wall_ms:.0f} ms (median of {args.steps}, under the profiler), of which "
        f"{total:.0f} ms inside XLA thunks (each instant's wall time split among the thunks "
        f"running then); the rest is dispatch, host work and idle threads.",
        "",
        "| kind | wall ms / step | share |",
        "|---|---|---|",
    ]
    for k, ms in sorted(s["by_kind"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {ms:.1f} | {100 * ms / total:.1f}% |")
    lines += ["", f"Top {args.top} instructions:", "",
              "| HLO instruction | kind | wall ms / step | calls / step | result | source | JAX op |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for op, ms in sorted(s["by_op"].items(), key=lambda kv: -kv[1])[: args.top]:
        info_op = hlo.get(op)
        jax_op = (info_op or {}).get("jax", "")
        jax_op = re.sub(r"^jit\([^)]*\)/", "", jax_op).replace("while/body/closed_call/", "")
        lines.append(
            f"| {op} | {kind_of(op, info_op)} | {ms:.1f} | "
            f"{s['count'][op] / args.steps:.0f} | {(info_op or {}).get('shape', '')} | {(info_op or {}).get('src', '')} | {jax_op[-60:]} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
