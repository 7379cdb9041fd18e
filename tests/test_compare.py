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
    model_verdicts,
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
