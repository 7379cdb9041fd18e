"""Error analysis of generated samples and the report tables (pure Python)."""

import json

import pytest

from jaxtune.eval.analysis import (
    analyze_generations,
    flat_metrics,
    normalize_answer,
    repeated_ngram_rate,
    token_f1,
)
from jaxtune.eval.report import compare_results, markdown_table, write_report


def test_answer_normalisation_and_f1():
    assert normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_repetition_rate():
    assert repeated_ngram_rate("a b c d e") == 0.0
    assert repeated_ngram_rate("a b") == 0.0
    # "go go go go go go": 4 trigrams, all ("go","go","go"): 3 of 4 repeat an earlier one.
    assert repeated_ngram_rate("go go go go go go") == pytest.approx(0.75)


def test_analyze_generations():
    texts = ["Paris.", "", "the the the the the the the the", "Berlin is big"]
    out = analyze_generations(
        texts,
        references=["paris", None, "x", ["Rome", "Berlin is big"]],
        finish_reasons=["eos", "eos", "length", "stop"],
        token_counts=[2, 0, 8, 3],
    )
    s = out["summary"]
    assert s["n"] == 4 and s["empty_rate"] == 0.25 and s["truncated_rate"] == 0.25
    assert s["n_with_reference"] == 3 and s["exact_match"] == pytest.approx(2 / 3)
    assert s["degenerate_rate"] == 0.25 and s["tokens"]["max"] == 8
    assert s["chars"]["max"] == len(texts[2]) and s["words"]["min"] == 0
    flags = out["samples"]
    assert flags[1]["empty"] and flags[2]["truncated"] and flags[2]["degenerate"]
    assert flags[0]["exact_match"] and "exact_match" not in flags[1]
    flat = flat_metrics(s)
    assert flat["chars_mean"] == s["chars"]["mean"] and flat["exact_match"] == s["exact_match"]


def test_reports(tmp_path):
    base = {"sst2": {"acc": 0.5, "acc_norm": 0.5, "n": 10}, "mmlu": {"acc": 0.3, "n": 2}}
    base["mmlu_anatomy"] = {"acc": 0.25, "acc_norm": 0.25, "n": 1}
    model = {"sst2": {"acc": 0.8, "acc_norm": 0.7, "n": 10}, "mmlu": {"acc": 0.35, "n": 2}}
    model["mmlu_anatomy"] = {"acc": 0.5, "acc_norm": 0.5, "n": 1}
    cmp = compare_results(base, model)
    assert cmp["sst2"]["acc"]["delta"] == pytest.approx(0.3)
    md = markdown_table(model)
    assert "| sst2 | 0.8000 | 0.7000 | 10 |" in md and "| anatomy | 0.5000 | 0.5000 | 1 |" in md
    paths = write_report(tmp_path, model, base=base, meta={"model": "m", "base_model": "b"})
    assert json.loads(paths["json"].read_text()) == model
    text = paths["md"].read_text()
    assert "| sst2 | acc | 0.5000 | 0.8000 | +0.3000 |" in text
    assert "| anatomy | 0.2500 | 0.5000 | +0.2500 |" in text
    assert json.loads(paths["meta"].read_text())["base_model"] == "b"
