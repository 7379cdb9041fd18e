"""``jaxtune compare``: Bradley-Terry / Elo, the judges, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxtune.eval import elo
from jaxtune.eval.judges import (
    Template,
    combine_orders,
    exact_match,
    metric_judgment,
    rouge_l,
)

# ---------------------------------------------------------------- Bradley-Terry / Elo


def simulate(true_elo, n_prompts, seed, tie_rate=0.0):
    """Outcomes [P, K] of every pair on every prompt under Bradley-Terry with ``true_elo``."""
    rng = np.random.default_rng(seed)
    pairs = elo.pairs_of(len(true_elo))
    diff = np.array([true_elo[i] - true_elo[j] for i, j in pairs])
    p_first = 1.0 / (1.0 + 10.0 ** (-diff / 400.0))
    out = (rng.random((n_prompts, len(pairs))) < p_first).astype(float)
    out[rng.random(out.shape) < tie_rate] = 0.5
    return out


def test_bradley_terry_recovers_known_ratings():
    true = np.array([1250.0, 1100.0, 1000.0, 650.0])
    centred = true - true.mean() + 1000.0
    outcomes = simulate(true, n_prompts=3000, seed=1)
    r = elo.elo_ratings(outcomes, 4, bootstrap=300, seed=0)
    assert list(np.argsort(-r["rating"])) == [0, 1, 2, 3]
    assert r["rating"].mean() == pytest.approx(1000.0)
    # 3000 games per pair: the standard error of a difference is ~ 10-15 Elo.
    np.testing.assert_allclose(r["rating"] - r["rating"][2], true - true[2], atol=30)
    assert np.all(r["low"] <= centred) and np.all(centred <= r["high"])
    assert np.all(r["high"] - r["low"] < 80)


def test_ties_count_half_and_all_ties_are_equal():
    # One win and two ties for A over B weigh as 2 wins to 1 loss (ties = half a win each).
    with_ties = np.array([[1.0], [0.5], [0.5]])
    without = np.array([[1.0], [1.0], [0.0]])
    np.testing.assert_allclose(elo.win_counts(with_ties, 2), elo.win_counts(without, 2))
    a = elo.elo_ratings(with_ties, 2, bootstrap=0)["rating"]
    b = elo.elo_ratings(without, 2, bootstrap=0)["rating"]
    np.testing.assert_allclose(a, b)
    # MLE of 2 wins in 3 (tiny prior aside): odds 2 -> 400 log10(2) = 120 Elo apart.
    assert a[0] - a[1] == pytest.approx(400 * np.log10(2), abs=2)
    m = elo.win_matrix(with_ties, 2)
    assert m["wins"].tolist() == [[0, 1], [0, 0]] and m["ties"].tolist() == [[0, 2], [2, 0]]
    ties = np.full((50, 3), 0.5)
    np.testing.assert_allclose(elo.elo_ratings(ties, 3, bootstrap=20)["rating"], 1000.0)


def test_undefeated_model_gets_a_finite_rating():
    outcomes = np.ones((20, 1))  # A beats B on every prompt
    r = elo.elo_ratings(outcomes, 2, bootstrap=50, seed=0)
    assert np.all(np.isfinite(r["rating"])) and np.all(np.isfinite(r["samples"]))
    assert r["rating"][0] > r["rating"][1] + 400


def test_summary_of_three_models_matches_its_judgments():
    from jaxtune.eval.compare import summarize

    rng = np.random.default_rng(3)
    outcomes = {0: "a", 1: "b", 2: "tie"}
    judgments = [
        {"id": p, "pair": [i, j], "outcome": outcomes[int(rng.integers(3)) if i else 0]}
        for p in range(40)
        for i, j in elo.pairs_of(3)
    ]  # model 0 wins every game it plays
    r = summarize(["x", "y", "z"], judgments, 40, bootstrap=50, seed=0)
    wins, ties = np.array(r["matrix"]["wins"]), np.array(r["matrix"]["ties"])
    for i, j in elo.pairs_of(3):
        got = [g["outcome"] for g in judgments if g["pair"] == [i, j]]
        assert (wins[i, j], wins[j, i], ties[i, j]) == (
            got.count("a"),
            got.count("b"),
            got.count("tie"),
        )
    assert (np.array(r["matrix"]["losses"]) == wins.T).all()
    assert r["elo"]["models"][0]["model"] == "x" and r["elo"]["models"][0]["score"] == 1.0
    assert sum(m["rating"] for m in r["elo"]["models"]) == pytest.approx(3000, abs=0.2)


# ---------------------------------------------------------------- judges


def test_metric_judges_on_hand_made_answers():
    ref = "The Eiffel Tower is in Paris."
    assert metric_judgment("exact", "eiffel tower is in paris", "Paris", ref)["outcome"] == "a"
    assert metric_judgment("exact", "Paris", "London", ref)["outcome"] == "tie"  # both 0
    assert metric_judgment("exact", "x", "Paris!", ["Berlin", "paris"])["outcome"] == "b"
    j = metric_judgment("f1", "in Paris", "in London", ref)
    assert j["outcome"] == "a" and j["scores"][0] > j["scores"][1] > 0
    j = metric_judgment("rougeL", "tower in Paris", "Paris tower in", ref)
    # Same words; order matters to the longest common subsequence: 3 vs 2 tokens.
    assert j["outcome"] == "a"
    assert exact_match("The answer.", "answer")
    assert rouge_l("", ref) == 0.0 and rouge_l("paris", "") == 0.0


def test_rouge_l_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat dog ran far 42 x-ray Über".split()
    for _ in range(200):
        pred = " ".join(rng.choice(words, rng.integers(0, 12)))
        ref = " ".join(rng.choice(words, rng.integers(1, 12)))
        want = scorer.score(ref, pred)["rougeL"].fmeasure
        assert rouge_l(pred, ref) == pytest.approx(want, abs=1e-12), (pred, ref)


def test_two_orders_cancel_position_bias():
    # A judge that always says "A" (prefers whatever is shown first) never gives a win.
    assert combine_orders("A", "A") == "tie"
    assert combine_orders("B", "B") == "tie"
    assert combine_orders("A", "B") == "a"  # a preferred in both positions
    assert combine_orders("B", "A") == "b"
    assert combine_orders("tie", "B") == "tie"


def test_template_plain_and_jinja():
    plain = Template("Q: {question}\nA: {answer_a}\nB: {answer_b}\nRef: {reference}")
    assert plain.render("q?", "x", "y", None) == "Q: q?\nA: x\nB: y\nRef: "
    jinja = Template("{{ question }}|{{ answer_a }}|{{ answer_b }}|{{ reference }}")
    assert jinja.render("q", "<b>", "y", ["r1", "r2"]) == "q|<b>|y|r1"
    from jaxtune.errors import ConfigError

    with pytest.raises(ConfigError, match="never uses"):
        Template("{question} {answer_a}")
    with pytest.raises(ConfigError, match="cannot fill"):
        Template("{question} {answer_a} {answer_b} {nope}")


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Two tiny random Llamas (different seeds) and a prompts file with references."""
    from jaxtune.train.testing import write_tiny_model

    root = tmp_path_factory.mktemp("compare")
    a = write_tiny_model(root / "a", seed=0)
    b = write_tiny_model(root / "b", seed=1)
    rows = [
        {"prompt": "Reverse: alpha beta", "reference": "beta alpha"},
        {"prompt": "Reverse: gamma delta eta", "reference": "eta delta gamma"},
        {"prompt": "<script>alert(1)</script> Reverse: mu", "reference": "mu"},
        {"prompt": "Reverse: iota kappa", "reference": ["kappa iota", "kappa"]},
        {"prompt": "Reverse: zeta theta lambda mu", "reference": "mu lambda theta zeta"},
    ]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "a": str(a), "b": str(b), "prompts": str(prompts), "rows": rows}


def _run(capsys, *argv):
    from jaxtune.cli import main

    rc = main(["compare", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_compare_cli_end_to_end(tiny_pair, capsys):
    t = tiny_pair
    out = t["root"] / "out_f1"
    models = f"{t['a']},{t['b']}"
    rc, stdout, err = _run(
        capsys,
        "--models",
        models,
        "--prompts",
        t["prompts"],
        "--judge",
        "f1",
        "--out",
        out,
        "--max-new-tokens",
        "4",
        "--bootstrap",
        "200",
    )
    assert rc == 0, err
    assert {p.name for p in out.iterdir()} >= {
        "samples.jsonl",
        "judgments.jsonl",
        "results.json",
        "results.md",
        "compare.html",
        "ratings.png",
    }
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in t["rows"]]
    assert all(set(s["outputs"]) == {t["a"], t["b"]} for s in samples)
    judgments = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(judgments) == len(t["rows"])  # one pair per prompt
    results = json.loads((out / "results.json").read_text())
    wins = results["matrix"]["wins"]
    ties = results["matrix"]["ties"]
    outcomes = [j["outcome"] for j in judgments]
    assert wins[0][1] == outcomes.count("a") and wins[1][0] == outcomes.count("b")
    assert ties[0][1] == outcomes.count("tie") and results["matrix"]["losses"][1][0] == wins[0][1]
    for j in judgments:  # each outcome follows its scores
        assert j["pair"] == [0, 1] and j["models"] == [t["a"], t["b"]]
        sa, sb = j["scores"]
        assert j["outcome"] == ("a" if sa > sb else "b" if sb > sa else "tie")
    ratings = [m["rating"] for m in results["elo"]["models"]]
    assert sum(ratings) / 2 == pytest.approx(1000.0, abs=0.1)
    assert all(m["low"] <= m["rating"] <= m["high"] for m in results["elo"]["models"])
    page = (out / "compare.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert (out / "ratings.png").read_bytes()[:4] == b"\x89PNG"
    assert "| rank | model | Elo |" in stdout
    # An earlier compare output is replaced only with --overwrite.
    rc, _, err = _run(
        capsys,
        "--models",
        models,
        "--prompts",
        t["prompts"],
        "--judge",
        "f1",
        "--out",
        out,
        "--max-new-tokens",
        "2",
    )
    assert rc == 2 and err.startswith("error:") and "--overwrite" in err


def test_judge_model_scores_both_orders(tiny_pair):
    """The model judge's path on a tiny model: every pair in both orders, outcome combined."""
    from jaxtune.eval.compare import judge_all

    rows = tiny_pair["rows"][:3]
    outputs = [["beta alpha", "eta", "mu"], ["alpha", "eta delta gamma", "<b>mu</b>"]]
    judgments = judge_all(
        tiny_pair["a"],
        "model",
        rows,
        outputs,
        template=Template(),
        chat=False,
        dtype="float32",
        batch_size=8,
    )
    assert sorted(j["id"] for j in judgments) == [0, 1, 2]
    for j in judgments:
        assert j["pair"] == [0, 1] and set(j["verdicts"]) == {"ab", "ba"}
        for order in ("ab", "ba"):
            a, b = j["logprobs"][order]
            assert np.isfinite([a, b]).all()
            assert j["verdicts"][order] == ("A" if a > b else "B" if b > a else "tie")
        assert j["outcome"] == combine_orders(j["verdicts"]["ab"], j["verdicts"]["ba"])


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "no such file"),
        ("bad_json", "prompts.jsonl:2: not valid JSON"),
        ("one_model", "expected two or more"),
        ("unknown_judge", "neither a metric"),
        ("no_reference", "has no 'reference'"),
        ("foreign_out", "not empty"),
        ("no_chat_template", "has no chat template"),
    ],
)
def test_compare_bad_input_is_one_error_line(tiny_pair, tmp_path, capsys, case, expect):
    t = tiny_pair
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Reverse: alpha", "reference": "alpha"}\n')
    models, judge, extra = f"{t['a']},{t['b']}", "exact", []
    out = tmp_path / "out"
    if case == "missing":
        prompts = tmp_path / "nope.jsonl"
    elif case == "bad_json":
        prompts.write_text('{"prompt": "a", "reference": "a"}\n{"prompt": \n')
    elif case == "one_model":
        models = t["a"]
    elif case == "unknown_judge":
        judge = "bleu"
    elif case == "no_reference":
        prompts.write_text('{"prompt": "Reverse: alpha"}\n')
    elif case == "no_chat_template":
        judge = t["a"]
        extra = ["--judge-chat"]
    elif case == "foreign_out":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    rc, _, err = _run(
        capsys, "--models", models, "--prompts", prompts, "--judge", judge, "--out", out, *extra
    )
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:") and expect in err, err
    if case == "foreign_out":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
