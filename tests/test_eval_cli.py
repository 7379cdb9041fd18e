"""``jaxtune eval``: reports, --compare tables, configs, generation tasks and bad inputs.

Two tiny random Llamas with the real SmolLM2 tokenizer (vocab 49152) stand in for a
model before and after fine-tuning, so the comparison machinery runs in seconds; the
real before/after (SmolLM2 + LoRA on SST-2) is a command in the report.
"""

import json

import pytest
import torch
import transformers

from jaxtune.api import load_tokenizer
from jaxtune.cli import main


def run_cli(argv: list[str]) -> int:
    """``jaxtune eval ARGV`` through the CLI."""
    return main(["eval", *argv])


def tiny_model_dir(path, seed, tokenizer):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_gguf, olmo_datasets):
    import datasets

    root = tmp_path_factory.mktemp("evalcli")
    tok = load_tokenizer(smollm2_gguf)
    base = tiny_model_dir(root / "base", 0, tok)
    tuned = tiny_model_dir(root / "tuned", 1, tok)
    sst2 = datasets.load_from_disk(str(olmo_datasets / "glue" / "sst2" / "validation"))
    task = root / "sst2.jsonl"
    with open(task, "w") as f:
        for row in sst2.select(range(24)):
            item = {
                "context": f"Review: {row['sentence'].strip()}\nSentiment:",
                "choices": [" negative", " positive"],
                "label": int(row["label"]),
            }
            f.write(json.dumps(item) + "\n")
    text = root / "heldout.jsonl"
    text.write_text(
        "\n".join(json.dumps({"text": row["sentence"]}) for row in sst2.select(range(24, 64)))
    )
    return {"root": root, "base": base, "tuned": tuned, "task": str(task), "text": str(text)}


def test_compare_writes_one_before_after_table(setup, capsys):
    out = setup["root"] / "cmp"
    rc = run_cli(
        [
            "--model",
            setup["tuned"],
            "--compare",
            setup["base"],
            "--tasks",
            f"{setup['task']},arc_easy",
            "--limit",
            "12",
            "--batch-size",
            "16",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "eval_report.json").read_text())
    base = json.loads((out / "eval_report_base.json").read_text())
    assert set(report) == {"sst2", "arc_easy"} and report["sst2"]["n"] == 12
    for r in (report, base):
        assert set(r["arc_easy"]) >= {"acc", "acc_norm", "n"} and 0 <= r["arc_easy"]["acc"] <= 1
    cmp = json.loads((out / "eval_compare.json").read_text())
    d = cmp["sst2"]["acc"]
    assert d["delta"] == pytest.approx(d["model"] - d["base"])
    md = (out / "eval_report.md").read_text()
    assert "| task | metric | before | after | change |" in md
    assert f"| sst2 | acc | {base['sst2']['acc']:.4f} | {report['sst2']['acc']:.4f} |" in md
    assert "| arc_easy | acc_norm |" in md
    preds = (out / "predictions" / "sst2.jsonl").read_text().splitlines()
    assert len(preds) == 12 and (out / "base" / "predictions" / "arc_easy.jsonl").is_file()
    assert "| sst2 | acc |" in capsys.readouterr().out


def test_config_run_with_perplexity_and_generation(setup, tmp_path):
    gen = tmp_path / "gen.jsonl"
    gen.write_text(
        '{"prompt": "Review: fine\\nSentiment:", "reference": "positive"}\n'
        '{"prompt": "Say hi:", "reference": ["hi", "hello"]}\n{"prompt": "Anything:"}\n'
    )
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        f"model:\n  path: {setup['tuned']}\ndata:\n  train: {setup['text']}\n"
        f"  validation: {setup['text']}\n  format: text\n"
        f"eval:\n  tasks: [perplexity, {setup['task']}, {gen}]\n  max_new_tokens: 6\n"
        f"peft:\n  method: full\ntrain:\n  steps: 1\n  seq_len: 32\nrun:\n  dir: {tmp_path / 'run'}\n"
    )
    assert run_cli([str(cfg), "eval.max_items=8", "--batch-size", "8"]) == 0
    report = json.loads((tmp_path / "run" / "eval" / "eval_report.json").read_text())
    ppl = report["perplexity"]
    assert ppl["tokens"] > 100 and ppl["perplexity"] == pytest.approx(2.718281828 ** ppl["loss"])
    assert report["sst2"]["n"] == 8
    g = report["gen"]
    assert g["n"] == 3 and g["n_with_reference"] == 2 and g["tokens_per_sec"] > 0
    assert g["truncated_rate"] + g["empty_rate"] <= 2 and 0 <= g["exact_match"] <= 1
    samples = (tmp_path / "run" / "eval" / "predictions" / "gen.jsonl").read_text().splitlines()
    assert {"prompt", "output", "finish_reason", "repeated_ngram_rate"} <= set(
        json.loads(samples[0])
    )
    md = (tmp_path / "run" / "eval" / "eval_report.md").read_text()
    assert "| perplexity |" in md and "| sst2 |" in md


@pytest.mark.parametrize(
    "line, message",
    [
        (
            '{"context": "c", "choices": ["a"], "label": 1}',
            "bad.jsonl:2: field 'label' = 1 is out of range",
        ),
        (
            '{"context": "c", "choices": [], "label": 0}',
            "bad.jsonl:2: field 'choices' must be a non-empty",
        ),
        ('{"context": "c", "label": 0}', "bad.jsonl:2: missing field 'choices'"),
    ],
)
def test_bad_task_file_is_one_line_error(setup, tmp_path, capsys, line, message):
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "c", "choices": ["a", "b"], "label": 0}\n' + line + "\n")
    out = tmp_path / "out"
    rc = run_cli(["--model", setup["base"], "--tasks", str(bad), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()  # validated before loading a model or writing anything


def test_unknown_task_and_missing_options(setup, tmp_path, capsys):
    rc = run_cli(["--model", setup["base"], "--tasks", "arc_esay", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "unknown task 'arc_esay'; did you mean 'arc_easy'?" in err
    assert "\n" not in err
    assert run_cli(["--tasks", "arc_easy"]) == 2
    assert "no model: pass --model PATH" in capsys.readouterr().err
    assert run_cli(["--model", setup["base"], "--tasks", "perplexity"]) == 2
    assert "task 'perplexity' needs held-out data" in capsys.readouterr().err
    assert run_cli(["--model", setup["base"], "--tasks", "arc_easy", "--limit", "0"]) == 2
    assert "--limit must be positive" in capsys.readouterr().err
    assert run_cli(["--model", str(tmp_path / "nope"), "--tasks", "arc_easy"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_run_tasks_reports_mmlu_subjects_and_macro_average(setup):
    import jaxtune
    from jaxtune.eval import run_tasks

    model = jaxtune.from_pretrained(setup["base"])
    tok = load_tokenizer(setup["base"])
    res = run_tasks(model, tok, "mmlu", limit=1, batch_size=32, log=None)
    subjects = [k for k in res if k.startswith("mmlu_")]
    assert len(subjects) == 57 and all(res[k]["n"] == 1 for k in subjects)
    macro = sum(res[k]["acc"] for k in subjects) / 57
    assert res["mmlu"]["acc"] == pytest.approx(macro) and res["mmlu"]["n"] == 57
    assert list(res)[0] == "mmlu"  # the average first, then the subjects


def test_preference_pairs_score_as_two_choice_items(setup, tmp_path, capsys):
    # Preference accuracy = the two-choice task whose gold is the chosen completion; the
    # multiple-choice path itself is checked item for item against lm-eval elsewhere.
    rows = [json.loads(x) for x in open(setup["task"])][:10]
    pairs, items = tmp_path / "pairs.jsonl", tmp_path / "items.jsonl"
    with open(pairs, "w") as fp, open(items, "w") as fi:
        for r in rows:
            good, bad = r["choices"][r["label"]], r["choices"][1 - r["label"]]
            fp.write(json.dumps({"prompt": r["context"], "chosen": good, "rejected": bad}) + "\n")
            fi.write(json.dumps({"context": r["context"], "choices": [good, bad], "label": 0}))
            fi.write("\n")
    out = tmp_path / "out"
    argv = ["--model", setup["tuned"], "--tasks", f"{pairs},{items}", "--out", str(out)]
    assert run_cli(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "eval_report.json").read_text())
    assert report["pairs"]["n"] == 10
    assert report["pairs"]["acc"] == report["items"]["acc"]
    assert report["pairs"]["acc_norm"] == report["items"]["acc_norm"]
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q:", "chosen": " a"}) + "\n")
    assert run_cli(["--model", setup["tuned"], "--tasks", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.jsonl:1: missing field 'rejected'" in err
