"""The real SmolLM2-135M-Instruct GGUF: jaxtune eval == transformers (torch) reference.

* ARC-Easy multiple choice: the same context / continuation token ids scored by jaxtune's
  shared-context KV-cache scorer and by one plain transformers forward per choice;
  per-item predictions agree on >= 99% of items, accuracy within 0.5 points. The test
  uses the first ``JAXTUNE_ARC_PARITY_ITEMS`` (default 25) items to fit a 2-core CI
  budget; ``benchmarks/arc_parity.py`` runs all 570.
* Held-out perplexity == transformers' loss on the same tokens (relative 1e-4).
* Greedy generation == transformers' ``generate``; stop strings end generation early.
"""

import json
import os

import numpy as np
import pytest

import jaxtune
from jaxtune.api import load_tokenizer
from jaxtune.data import BatchIterator, DataConfig, build_datasets
from jaxtune.eval.generate import (
    SamplingConfig,
    eos_token_ids,
    generate_ids,
    generate_text,
    render_prompt,
)
from jaxtune.eval.multiple_choice import accuracy_metrics, predictions
from jaxtune.eval.perplexity import evaluate_loss
from jaxtune.eval.reference import (
    load_torch_model,
    torch_greedy,
    torch_loss_sums,
    torch_score_token_requests,
)
from jaxtune.eval.scoring import ChoiceScores, encode_request, score_token_requests
from jaxtune.eval.tasks import load_task

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("hf_gguf_parses_once")]

# 25 items keep `make test` inside its time budget; JAXTUNE_ARC_PARITY_ITEMS=570 scores all.
N_ITEMS = int(os.environ.get("JAXTUNE_ARC_PARITY_ITEMS", "25"))
HELD_OUT = [
    "The Pacific Ocean is the largest and deepest of Earth's five oceanic divisions. It extends "
    "from the Arctic Ocean in the north to the Southern Ocean in the south.",
    "Photosynthesis is a process used by plants and other organisms to convert light energy into "
    "chemical energy that, through cellular respiration, can later be released to fuel activities.",
    "A violin is a wooden chordophone, and is the smallest, and thus highest-pitched instrument in "
    "regular use in the violin family. Most violins have a hollow wooden body.",
    "The French Revolution was a period of political and societal change in France that began "
    "with the Estates General of 1789 and ended with the coup of 18 Brumaire in November 1799.",
]


@pytest.fixture(scope="module")
def jax_model(smollm2_gguf):
    return jaxtune.from_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def torch_model(smollm2_gguf):
    return load_torch_model(smollm2_gguf)


def test_arc_easy_scores_match_transformers(jax_model, torch_model, tok):
    items = load_task("arc_easy", limit=N_ITEMS)
    encoded = [encode_request(tok, it.context, it.choices) for it in items]
    ours = score_token_requests(jax_model, encoded, batch_size=32)
    ref = torch_score_token_requests(torch_model, encoded, batch_size=16)
    ref_scores = [
        ChoiceScores(r, np.asarray([len(c) for c in conts]), np.zeros(len(r), bool))
        for r, (_, conts) in zip(ref, encoded, strict=True)
    ]
    p_ours, p_ref = predictions(items, ours), predictions(items, ref_scores)
    agree = np.mean([a["pred"] == b["pred"] for a, b in zip(p_ours, p_ref, strict=True)])
    agree_norm = np.mean(
        [a["pred_norm"] == b["pred_norm"] for a, b in zip(p_ours, p_ref, strict=True)]
    )
    m_ours, m_ref = accuracy_metrics(p_ours), accuracy_metrics(p_ref)
    diff = max(np.abs(a.logprob - b).max() for a, b in zip(ours, ref, strict=True))
    print(
        f"\nARC-Easy ({len(items)} items): agreement acc {agree:.4f} acc_norm {agree_norm:.4f}; "
        f"jaxtune acc {m_ours['acc']:.4f} / acc_norm {m_ours['acc_norm']:.4f}, transformers "
        f"acc {m_ref['acc']:.4f} / acc_norm {m_ref['acc_norm']:.4f}; max |logprob diff| {diff:.2e}"
    )
    assert agree >= 0.99 and agree_norm >= 0.99
    assert abs(m_ours["acc"] - m_ref["acc"]) <= 0.005
    assert abs(m_ours["acc_norm"] - m_ref["acc_norm"]) <= 0.005
    assert m_ours["acc"] > 0.35  # well above chance (0.25): the prompts are right


def test_perplexity_matches_transformers(jax_model, torch_model, tok, tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in HELD_OUT) + "\n")
    cfg = DataConfig(train=str(path), format="text", cache_dir=str(tmp_path / "cache"))
    ds = build_datasets(cfg, tok, 48, splits=("train",))["train"]
    ours = evaluate_loss(jax_model, ds, batch_size=4)
    s = w = 0.0
    it = BatchIterator(ds, 4, shuffle=False, drop_remainder=False, num_epochs=1)
    for batch in it:
        bs, bw = torch_loss_sums(torch_model, batch)
        s, w = s + bs, w + bw
    ref = s / w
    rel = abs(ours["loss"] - ref) / ref
    print(
        f"\nheld-out loss: jaxtune {ours['loss']:.6f} (ppl {ours['perplexity']:.3f}), "
        f"transformers {ref:.6f}, relative diff {rel:.2e}, {ours['tokens']} tokens"
    )
    assert ours["tokens"] == int(w) and ours["tokens"] > 100
    assert rel <= 1e-4


def test_greedy_generation_matches_transformers(jax_model, torch_model, tok):
    ids = render_prompt(tok, "What is the capital of France?", chat=True)
    eos = eos_token_ids(jax_model, tok)
    ours, stats = generate_ids(jax_model, [ids], eos, SamplingConfig(max_new_tokens=24))
    ref = torch_greedy(torch_model, ids, 24, eos)
    print(f"\njaxtune: {tok.decode(ours[0])!r}\ntransformers: {tok.decode(ref)!r}")
    assert ours[0] == ref
    assert "Paris" in tok.decode(ours[0])


def test_stop_strings_end_generation_early(jax_model, tok):
    sampling = SamplingConfig(max_new_tokens=48)
    prompt = ["Write two short sentences about the sea."]
    full, _ = generate_text(jax_model, tok, prompt, sampling, chat=True)
    assert "." in full[0]
    texts, stats = generate_text(jax_model, tok, prompt, sampling, chat=True, stop=["."])
    assert texts[0] == full[0][: full[0].index(".")]
    assert stats["finish_reasons"] == ["stop"] and stats["token_counts"][0] < 48
