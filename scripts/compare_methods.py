"""Compare fine-tuning methods on one classification task; write one table.

    python scripts/compare_methods.py [CONFIG] [--only SUBSTRING ...] [--out DIR]

CONFIG (default ``configs/compare_sst2.yaml``) holds ``base`` (a jaxtune run config),
``runs`` (each a name, dotted ``set`` overrides and optional ``feature`` options) and
``out_dir``. Each run is one call of :func:`jaxtune.train.compare.run` in its own process,
so wall time and peak memory (max RSS) are its own. Writes ``results.json`` and
``results.md`` (accuracy, macro-F1, trainable parameters, wall time, peak memory, and
whether the run beats the majority-class baseline on the held-out split).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "configs" / "compare_sst2.yaml"


def one_run(spec_path: Path, index: int, out_json: Path) -> None:
    """Child process: run ``runs[index]`` and write its result as JSON."""
    from jaxtune.config import load_config

    spec = yaml.safe_load(spec_path.read_text())
    run = spec["runs"][index]
    # base as dotted overrides (JSON is YAML flow syntax), then the run's own: the config
    # is validated once, as a whole, like `jaxtune train CONFIG key=value ...`.
    base = [
        f"{section}.{key}={json.dumps(value)}"
        for section, values in spec["base"].items()
        for key, value in values.items()
    ]
    cfg = load_config(None, [*base, *run.get("set", [])])
    feature = {"cache_dir": spec.get("feature_cache"), **(run.get("feature") or {})}
    from jaxtune.train.compare import run as classify_run

    result = classify_run(cfg, feature=feature, log=lambda m: print(f"  [{run['name']}] {m}"))
    result.pop("_model", None)
    result["name"] = run["name"]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # ru_maxrss is KiB on Linux: the peak resident memory of this process. CPU seconds
    # do not depend on what else the machine runs (wall time does).
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    out_json.write_text(json.dumps(result, indent=2))


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def table(results: list[dict]) -> str:
    majority = next((r["majority"] for r in results if "majority" in r), 0.0)
    lines = [
        "| method | accuracy | macro-F1 | trainable params | wall time | CPU time | peak memory "
        "| > majority |",
        "|---|---|---|---|---|---|---|---|",
        f"| majority class (train majority on test) | {majority:.3f} | - | - | - | - | - | - |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | | no |")
            continue
        pct = 100 * r["trainable_params"] / max(r["total_params"], 1)
        share = f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"
        lines.append(
            f"| {r['name']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
            f"{_fmt_params(r['trainable_params'])} ({share}) | {r['wall_seconds']:.0f} s | "
            f"{r['cpu_seconds']:.0f} s | {r['peak_rss_mib']:.0f} MiB | "
            f"{'yes' if r['accuracy'] > r['majority'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default=str(DEFAULT))
    ap.add_argument("--only", action="append", default=[], help="run names containing this")
    ap.add_argument("--out", help="output dir (default: out_dir of the config)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    spec_path = Path(args.config)
    if args.one is not None:
        one_run(spec_path, args.one, Path(args.json))
        return 0
    spec = yaml.safe_load(spec_path.read_text())
    out = Path(args.out or spec.get("out_dir", "runs/compare"))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    for i, run in enumerate(spec["runs"]):
        if args.only and not any(s.lower() in run["name"].lower() for s in args.only):
            continue
        print(f"== {run['name']}", flush=True)
        out_json = out / "runs" / f"{i:02d}.json"
        out_json.unlink(missing_ok=True)
        start = time.perf_counter()
        cmd = [sys.executable, __file__, str(spec_path), "--one", str(i), "--json", str(out_json)]
        proc = subprocess.run(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not out_json.exists():
            results.append({"name": run["name"], "error": f"exit {proc.returncode}"})
            continue
        r = json.loads(out_json.read_text())
        r["wall_seconds"] = wall  # process start to finish: imports, loading, compiles, all
        results.append(r)
        print(
            f"   accuracy {r['accuracy']:.3f}  macro-F1 {r['macro_f1']:.3f}  "
            f"{wall:.0f}s  {r['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    md = table(results)
    total = time.perf_counter() - t0
    cpu = sum(r.get("cpu_seconds", 0.0) for r in results)
    load = os.getloadavg()[1]
    n_test = next((r["n"] for r in results if "n" in r), 0)
    text = (
        f"# Fine-tuning methods on SST-2 ({n_test} held-out sentences)\n\n{md}\n\n"
        f"Config: `{spec_path}`; total {total:.0f} s wall, {cpu:.0f} s CPU; load average "
        f"{load:.1f} on {os.cpu_count()} cores at the end. Wall time = the run's whole process "
        "(imports, model load, feature extraction or training, evaluation); CPU time = its "
        "user + system seconds (independent of other load); peak memory = its max RSS.\n"
    )
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(
        json.dumps({"config": str(spec_path), "total_seconds": total, "runs": results}, indent=2)
    )
    print("\n" + md + f"\n\ntotal {total:.0f} s; written to {out}/results.md and results.json")
    ok = all("error" not in r and r["accuracy"] > r["majority"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
