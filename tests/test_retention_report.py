"""Retention (before/after general benchmarks), generation samples and the run report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxtune
from jaxtune.config import load_config
from jaxtune.errors import ConfigError
from jaxtune.eval.analysis import analyze_generations, category_counts, error_category
from jaxtune.eval.runner import default_max_len, load_tasks, score_tasks
from jaxtune.loading import load_tokenizer
from jaxtune.train import testing as T
from jaxtune.train.loop import train
from jaxtune.train.retention import cache_key
from jaxtune.train.samples import prompt_and_reference
from jaxtune.train.sweep import sweep

ROOT = Path(__file__).resolve().parent.parent
RETENTION = "{retention: [arc_easy, hellaswag], retention_items: 6, generate_samples: 2, max_new_tokens: 6, batch_size: 8}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("retention")
    T.write_tiny_model(root / "model")
    T.write_reverse_data(root / "train.jsonl", n=32)
    with T.persistent_compile_cache(root / "xla"):
        yield root


def _cfg(root, name, *over, eval_=RETENTION):
    return load_config(_cfg_path(root, name, eval_), list(over))


def _cfg_path(root, name, eval_=RETENTION) -> Path:
    data = (
        f"{{train: {root / 'train.jsonl'}, format: instruction, template: plain, "
        f"length_buckets: [32], validation_fraction: 0.25, cache_dir: {root / 'cache'}}}"
    )
    path = T.write_config(
        root / name / "cfg.yaml",
        root / "model",
        root / "train.jsonl",
        root / name / "run",
        data=data,
        eval=eval_,
        optim="{lr: 0.05, schedule: constant}",
        train="{steps: 4, batch_size: 8, seq_len: 32}",
        checkpoint="{every: 0, async_save: false}",
    )
    return path


def _scores(model_path, names=("arc_easy", "hellaswag"), items=6):
    """The tasks scored directly on a model (no trainer involved)."""
    model = jaxtune.from_pretrained(model_path)
    loaded = load_tasks(list(names), limit=items)
    return score_tasks(
        model,
        load_tokenizer(model_path),
        loaded,
        batch_size=8,
        max_len=default_max_len(model),
        log=None,
    )


def test_retention_is_base_then_trained_model_and_the_base_is_cached(root, monkeypatch):
    monkeypatch.setenv("JAXTUNE_CACHE", str(root / "jt_cache"))
    out = train(_cfg(root, "a"))
    run = Path(out["run_dir"])
    result = json.loads((run / "eval" / "retention.json").read_text())
    base, tuned = _scores(root / "model"), _scores(run)
    for task, metric in (("arc_easy", "acc"), ("hellaswag", "acc_norm")):
        r = result["tasks"][task]
        assert r["metric"] == metric and r["n"] == 6
        assert r["before"] == pytest.approx(base[task][metric])
        assert r["after"] == pytest.approx(tuned[task][metric])
        assert out["eval"][f"retention/{task}/{metric}"] == pytest.approx(r["after"])
    mean = np.mean([result["tasks"][t]["change"] for t in ("arc_easy", "hellaswag")])
    assert out["eval"]["retention/change"] == pytest.approx(mean)
    assert result["before_source"] == "scored at step 0"

    # Another run of the same base (a sweep's next learning rate) reads the base scores
    # from the cache instead of scoring them again.
    out_b = train(_cfg(root, "b", "optim.lr=0.02"))
    result_b = json.loads((Path(out_b["run_dir"]) / "eval" / "retention.json").read_text())
    assert result_b["before_source"].startswith("cache ")
    assert result_b["before"] == pytest.approx(result["before"])

    # The report shows it, with the other sections.
    md = (run / "report.md").read_text()
    for section in (
        "## Data",
        "## Training",
        "## Retention",
        "## Contamination",
        "## Generation samples",
    ):
        assert section in md
    assert f"| hellaswag | acc_norm | {result['tasks']['hellaswag']['before']:.4f} |" in md
    assert "![loss curves](loss_curve.png)" in md and (run / "loss_curve.png").exists()
    assert "| arc_easy (retention) | 6 |" in md  # contamination of the retention items
    samples = [
        json.loads(x) for x in (run / "eval" / "samples_after.jsonl").read_text().splitlines()
    ]
    assert len(samples) == 2 and all(s["split"] == "validation" for s in samples)
    assert all(s["prompt"].startswith("Reverse") and s["reference"] for s in samples)


def test_sweep_results_have_the_retention_change(root, monkeypatch):
    monkeypatch.setenv("JAXTUNE_CACHE", str(root / "jt_cache"))
    out = root / "sweep_out"
    res = sweep(
        _cfg_path(root, "sweep_cfg"), ["optim.lr=0.05,0.01"], out=out, metric="retention_change"
    )
    assert len(res["rows"]) == 2
    for row in res["rows"]:
        result = json.loads((out / row["name"] / "eval" / "retention.json").read_text())
        assert row["retention_change"] == pytest.approx(result["change"])
        assert row["retention"]["hellaswag/acc_norm"] == pytest.approx(
            result["tasks"]["hellaswag"]["after"]
        )
    md = (out / "results.md").read_text()
    assert "| retention_change |" in md and "Best run by `retention_change` (higher" in md


def test_cache_key_changes_with_the_model_files_and_settings(root):
    cfg = _cfg(root, "key")
    mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    key = cache_key(cfg, ["arc_easy"], mesh)
    assert key == cache_key(cfg, ["arc_easy"], mesh)
    assert key != cache_key(cfg, ["arc_easy", "hellaswag"], mesh)
    assert key != cache_key(cfg, ["arc_easy"], {"data": 1, "fsdp": 8, "tensor": 1})
    assert key != cache_key(_cfg(root, "key", "eval.retention_items=7"), ["arc_easy"], mesh)
    assert key != cache_key(_cfg(root, "key", "peft.method=dora"), ["arc_easy"], mesh)
    weights = root / "model" / "model.safetensors"
    st = weights.stat()
    try:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a replaced file
        assert key != cache_key(cfg, ["arc_easy"], mesh)
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_retention_off_and_bad_retention_tasks(root, capsys):
    out = train(_cfg(root, "off", eval_="{retention: [], generate_samples: 0}"))
    run = Path(out["run_dir"])
    assert not any(k.startswith("retention/") for k in out["eval"])
    md = (run / "report.md").read_text()
    assert "Off (`eval.retention: []`)." in md and "eval.generate_samples: 0" in md
    # A task that is not multiple-choice is refused before the run dir exists.
    with pytest.raises(ConfigError, match="eval.retention: perplexity is a perplexity task"):
        train(_cfg(root, "bad", "eval.retention=[perplexity]"))
    with pytest.raises(ConfigError, match="arc_eesy"):
        train(_cfg(root, "bad", "eval.retention=[arc_eesy]"))
    assert not (root / "bad" / "run").exists()


def test_prompt_cut_is_where_training_starts(smollm2_tokenizer, tmp_path):
    """The sample prompt is the exact tokenized prompt of an instruction example."""
    from jaxtune.data import build_datasets

    rows = [{"instruction": "Add 2 and 3.", "output": "5"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            f"data.train={tmp_path / 'd.jsonl'}",
            "data.format=instruction",
            "data.template=alpaca",
            f"data.cache_dir={tmp_path / 'c'}",
            "train.steps=1",
            "peft.method=full",
        ],
    )
    ds = build_datasets(cfg.data, smollm2_tokenizer, 128)["train"]
    prompt, ref = prompt_and_reference(*ds.example(0))
    text = smollm2_tokenizer.decode(prompt)
    assert text.endswith("### Response:\n") and "Add 2 and 3." in text
    assert smollm2_tokenizer.decode(ref, skip_special_tokens=True) == "5"
    assert ref[-1] == smollm2_tokenizer.eos_token_id
    # Text data (every token trained): the first half, at most 32 tokens, is the prompt.
    ids = np.arange(100, 180)
    p, r = prompt_and_reference(ids, np.r_[0, np.ones(79, np.uint8)])
    assert len(p) == 32 and r == list(range(132, 180))
    assert prompt_and_reference(ids, np.zeros(80, np.uint8)) is None


def test_error_categories():
    texts = ["", "the the the the the the the the", "Paris", "paris is big", "Lyon", "x y z"]
    a = analyze_generations(
        texts,
        references=["Paris", "Paris", "Paris.", "Paris", "Paris", None],
        finish_reasons=["eos", "eos", "eos", "eos", "length", "eos"],
    )
    cats = [error_category(s) for s in a["samples"]]
    assert cats == ["empty", "repetitive", "exact match", "partial", "too long", "answered"]
    assert category_counts(a["samples"])["exact match"] == 1
    wrong = analyze_generations(["London"], references=["Paris"], finish_reasons=["eos"])
    assert error_category(wrong["samples"][0]) == "wrong"


@pytest.mark.slow
def test_retention_appears_in_the_quickstarts_report(tmp_path):
    """`make quickstart`'s script (SmolLM2 + LoRA on SST-2), cut down: its report.md has
    the retention table beside the SST-2 table."""
    data = tmp_path / "data"
    over = [
        f"data.train={data / 'train.jsonl'}",
        f"data.validation={data / 'validation.jsonl'}",
        f"data.test={data / 'test.jsonl'}",
        f"run.dir={tmp_path / 'run'}",
        "train.steps=2",
        "train.max_eval_batches=1",
        "checkpoint.every=0",
        "eval.retention_items=4",
        "eval.generate_samples=1",
        "logging.progress=false",
    ]
    env = {**os.environ, **T.compile_cache_env(tmp_path / "xla"), "JAXTUNE_CACHE": str(tmp_path)}
    # One CPU device, as `make quickstart` runs (conftest fakes 8 for the sharding tests).
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env["XLA_FLAGS"] = flags.strip()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "quickstart.py"), "--test-items", "8", *over],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "retention (ARC-Easy acc, HellaSwag acc_norm): mean change" in proc.stdout
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## SST-2 test accuracy, before / after" in md and "## Retention" in md
    assert "bias probe, base model" in proc.stdout and "bias probe, fine-tuned" in proc.stdout
    assert "## Bias probe, before / after" in md and "| pronoun | 1 | " in md
    # (That "before" is the base model's score is checked on a tiny model above.)
    result = json.loads((tmp_path / "run" / "eval" / "retention.json").read_text())
    for task, metric in (("arc_easy", "acc"), ("hellaswag", "acc_norm")):
        r = result["tasks"][task]
        assert r["metric"] == metric and r["n"] == 4 and 0 <= r["before"] <= 1
        assert f"| {task} | {metric} | {r['before']:.4f} | {r['after']:.4f} |" in md
    assert "| sst2" not in md and "## Generation samples" in md
    sample = json.loads((tmp_path / "run" / "eval" / "samples_before.jsonl").read_text())
    assert sample["prompt"].endswith("Sentiment:") and sample["reference"].strip() in (
        "negative",
        "positive",
    )
