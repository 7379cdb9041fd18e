"""Log-likelihood scoring (shared-context KV cache) and classification / accuracy metrics."""

import numpy as np
import pytest

from jaxtune.api import load_tokenizer
from jaxtune.errors import DataError
from jaxtune.eval.classification import classification_metrics, classification_report
from jaxtune.eval.multiple_choice import accuracy_metrics, grouped_metrics, predictions
from jaxtune.eval.scoring import (
    ChoiceScores,
    bucket_length,
    classify_by_verbalizer,
    encode_request,
    score_choices,
    score_requests,
    score_token_requests,
)
from jaxtune.eval.tasks import MCItem
from jaxtune.models import init_model
from jaxtune.models.llama import LlamaConfig
from jaxtune.verify import numpy_logits


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    """The SmolLM2 tokenizer as ``jaxtune eval`` loads it (from the GGUF metadata)."""
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def tiny():
    return init_model(LlamaConfig.tiny(vocab_size=128), seed=1)


def full_forward_scores(model, pairs, length=64):
    """Reference: plain forwards over context + continuation (no cache), one compile.

    Rows are right-padded to ``length``: causal attention never sees the padding.
    """
    ids = np.zeros((len(pairs), length), np.int32)
    for r, (ctx, cont) in enumerate(pairs):
        ids[r, : len(ctx) + len(cont)] = ctx + cont
    logits = numpy_logits(model, ids).astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    out = []
    for r, (ctx, cont) in enumerate(pairs):
        n = len(ctx)
        lp = sum(logp[r, n - 1 + j, t] for j, t in enumerate(cont))
        greedy = all(logits[r, n - 1 + j].argmax() == t for j, t in enumerate(cont))
        out.append((lp, greedy))
    return out


def test_bucket_length_is_bounded():
    assert [bucket_length(n) for n in (1, 8, 9, 16, 17, 24, 25, 33, 100)] == [
        8,
        8,
        16,
        16,
        24,
        24,
        32,
        48,
        128,
    ]
    assert bucket_length(1, 1) == 1 and bucket_length(3, 1) == 4
    for n in range(1, 3000):
        b = bucket_length(n, 1)
        assert n <= b < max(2 * n, 2)


def test_shared_context_equals_full_forward(tiny):
    """Context once in a KV cache, C continuations against it == C plain forwards."""
    rng = np.random.default_rng(0)
    reqs = []
    for n_ctx in (1, 2, 9, 17, 30, 33):
        ctx = rng.integers(1, 128, n_ctx).tolist()
        conts = [
            rng.integers(1, 128, rng.integers(1, 11)).tolist() for _ in range(rng.integers(1, 5))
        ]
        reqs.append((ctx, conts))
    # A continuation that is the model's own greedy choice: greedy must be True for it.
    ctx = reqs[2][0]
    greedy_tok = int(numpy_logits(tiny, np.asarray([ctx], np.int32))[0, -1].argmax())
    reqs.append((ctx, [[greedy_tok], [(greedy_tok + 1) % 128]]))
    out = score_token_requests(tiny, reqs, batch_size=16)  # 4 requests per batch: 2 batches
    refs = iter(full_forward_scores(tiny, [(c, x) for c, conts in reqs for x in conts]))
    for (ctx, conts), s in zip(reqs, out, strict=True):
        assert s.logprob.shape == (len(conts),)
        for j, cont in enumerate(conts):
            ref, greedy = next(refs)
            assert abs(ref - s.logprob[j]) < 1e-4, (ctx, cont, ref, s.logprob[j])
            assert greedy == bool(s.greedy[j])
            assert s.tokens[j] == len(cont)
    assert out[-1].greedy.tolist() == [True, False]


def test_left_truncation_keeps_the_end_of_the_context(tiny):
    rng = np.random.default_rng(1)
    ctx = rng.integers(1, 128, 40).tolist()
    conts = [[5, 6, 7], [9]]
    (s,) = score_token_requests(tiny, [(ctx, conts)], max_len=20)
    refs = full_forward_scores(tiny, [(ctx[-(20 - 3) :], cont) for cont in conts])
    for j, (ref, _) in enumerate(refs):
        assert abs(ref - s.logprob[j]) < 1e-4


def test_encode_request_follows_the_harness(tok):
    ctx, conts = encode_request(tok, "Question: Is water wet?\nAnswer:", [" yes", " no"])
    assert ctx == tok("Question: Is water wet?\nAnswer:")["input_ids"]
    assert tok.decode(conts[0]) == " yes" and tok.decode(conts[1]) == " no"
    # A trailing space in the context moves into the continuation ("Answer: " + "yes").
    ctx2, conts2 = encode_request(tok, "Question: Is water wet?\nAnswer: ", ["yes"])
    assert ctx2 == ctx and conts2[0] == conts[0]
    # An empty context conditions on the BOS/EOS token.
    ctx3, _ = encode_request(tok, "", ["Hello"])
    assert len(ctx3) == 1


def test_text_scoring_apis_agree(tok):
    """score_choices / score_requests / classify_by_verbalizer on a tiny model, SmolLM2 vocab."""
    model = init_model(LlamaConfig.tiny(vocab_size=49152, hidden_size=32, num_layers=1), seed=0)
    prompts = ["Review: a fine film\nSentiment:", "Review: dull and long\nSentiment:"]
    labels = [" negative", " positive"]
    scores = score_choices(model, tok, [(p, labels) for p in prompts])
    flat = score_requests(model, tok, [(p, v) for p in prompts for v in labels])
    assert flat.shape == (4, 2)
    np.testing.assert_allclose(flat[:, 0], np.concatenate([s.logprob for s in scores]), rtol=1e-6)
    pred = classify_by_verbalizer(model, tok, prompts, labels)
    assert pred.tolist() == [int(np.argmax(s.logprob)) for s in scores]
    ctx, conts = encode_request(tok, prompts[0], labels)
    ((ref, _),) = full_forward_scores(model, [(ctx, conts[0])], length=16)
    assert abs(ref - scores[0].logprob[0]) < 1e-4


def test_classification_metrics_by_hand():
    gold = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    m = classification_metrics(pred, gold, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 * 1 / 1.5]
    assert m["per_class_f1"] == pytest.approx(f1)
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    # Padding rows (gold -1) are dropped; ids out of range are errors.
    assert classification_metrics([0, 1], [0, -1], 2)["n"] == 1
    with pytest.raises(DataError, match="predicted class id 3 is out of range for 3 classes"):
        classification_metrics([3], [0], 3)
    m, md = classification_report(pred, gold, ["neg", "neu", "pos"])
    assert "| gold \\ predicted | neg | neu | pos | F1 |" in md and "| neg | 2 | 1 | 0 |" in md


def test_acc_and_acc_norm_conventions():
    items = [
        # acc picks the short answer (higher summed log-prob); per character the long one wins.
        MCItem("q", (" a", " abcdefghij"), 1, (1, 10)),
        MCItem("q", (" x", " y"), 0, (1, 1)),
    ]
    scores = [
        ChoiceScores(np.array([-2.0, -5.0]), np.array([1, 4]), np.array([True, False])),
        ChoiceScores(np.array([-1.0, -1.0]), np.array([1, 1]), np.array([True, True])),
    ]
    preds = predictions(items, scores)
    assert [p["pred"] for p in preds] == [0, 0]  # ties go to the first choice
    assert [p["pred_norm"] for p in preds] == [1, 0]
    m = accuracy_metrics(preds)
    assert m["acc"] == 0.5 and m["acc_norm"] == 1.0 and m["n"] == 2
    for p, g in zip(preds, ("x", "y"), strict=True):
        p["group"] = g
    preds.append({**preds[1], "group": "y"})
    g = grouped_metrics("mmlu", preds)
    assert g["mmlu_x"]["acc"] == 0.0 and g["mmlu_y"]["acc"] == 1.0
    assert g["mmlu"]["acc"] == 0.5 and g["mmlu"]["acc_micro"] == pytest.approx(2 / 3)
