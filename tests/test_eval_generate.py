"""KV-cache generation == step-by-step decoding without a cache == transformers' generate."""

import numpy as np
import pytest
import torch
import transformers

import jaxtune
from jaxtune.api import load_tokenizer
from jaxtune.eval.generate import (
    SamplingConfig,
    cut_at_stop,
    generate_ids,
    render_prompt,
    sample_logits,
)
from jaxtune.verify import numpy_logits

VOCAB = 96
EOS = 2
PROMPTS = [[5, 17, 33, 41, 8, 9, 60], [7, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random HF Llama (GQA) saved to disk, its torch model and the jaxtune load."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper logits: fewer near-ties between implementations
        model.lm_head.weight.mul_(4.0)
    path = tmp_path_factory.mktemp("gen") / "tiny_llama"
    model.save_pretrained(path)
    return model.eval(), jaxtune.from_pretrained(path)


def no_cache_greedy(model, prompt, n):
    """Reference: re-run the whole sequence for every new token (right-padded, one compile)."""
    seq = list(prompt)
    for _ in range(n):
        ids = np.zeros((1, 32), np.int32)
        ids[0, : len(seq)] = seq
        tok = int(numpy_logits(model, ids)[0, len(seq) - 1].argmax())
        if tok == EOS:
            break
        seq.append(tok)
    return seq[len(prompt) :]


def hf_greedy(model, prompts, n):
    """transformers' generate on a left-padded batch (its cache, its position ids)."""
    p = max(len(x) for x in prompts)
    ids = torch.zeros((len(prompts), p), dtype=torch.long)
    mask = torch.zeros((len(prompts), p), dtype=torch.long)
    for i, row in enumerate(prompts):
        ids[i, p - len(row) :] = torch.tensor(row)
        mask[i, p - len(row) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=0,
        )
    res = []
    for row in out[:, p:].tolist():
        res.append(row[: row.index(EOS)] if EOS in row else row)
    return res


def test_greedy_cache_equals_no_cache_and_transformers(tiny_hf):
    torch_model, model = tiny_hf
    n = 16
    ours, stats = generate_ids(model, PROMPTS, [EOS], SamplingConfig(max_new_tokens=n))
    ref_hf = hf_greedy(torch_model, PROMPTS, n)
    for prompt, got, hf in zip(PROMPTS, ours, ref_hf, strict=True):
        assert got == no_cache_greedy(model, prompt, n)
        assert got == hf
        assert len(got) > 3
    assert stats["tokens"] == sum(len(x) for x in ours) and stats["tokens_per_sec"] > 0
    assert len(stats["finish_reasons"]) == 3
    # Batch composition does not change a row (left padding + positions from the mask).
    alone, _ = generate_ids(model, [PROMPTS[1]], [EOS], SamplingConfig(max_new_tokens=n))
    assert alone[0] == ours[1]


def test_sampling_options(tiny_hf):
    _, model = tiny_hf
    greedy, _ = generate_ids(model, PROMPTS, [EOS], SamplingConfig(max_new_tokens=16))
    top1, _ = generate_ids(
        model, PROMPTS, [EOS], SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=1)
    )
    assert top1 == greedy
    nucleus, _ = generate_ids(
        model, PROMPTS, [EOS], SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=1e-6)
    )
    assert nucleus == greedy
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.5, seed=3)
    a, _ = generate_ids(model, PROMPTS, [EOS], cfg)
    b, _ = generate_ids(model, PROMPTS, [EOS], cfg)
    assert a == b  # a seed fixes the samples
    # Finish reasons: a 2-token budget truncates (length); an EOS-only vocabulary ends at once.
    out, stats = generate_ids(model, PROMPTS, [EOS], SamplingConfig(max_new_tokens=2))
    assert stats["finish_reasons"] == ["length"] * 3 and all(len(x) == 2 for x in out)
    first = [x[0] for x in greedy]
    out, stats = generate_ids(model, PROMPTS, first, SamplingConfig(max_new_tokens=16))
    assert out == [[], [], []] and stats["finish_reasons"] == ["eos"] * 3


def test_stop_function_ends_rows_early(tiny_hf):
    _, model = tiny_hf
    full, _ = generate_ids(model, PROMPTS, [EOS], SamplingConfig(max_new_tokens=16))
    out, stats = generate_ids(
        model,
        PROMPTS,
        [EOS],
        SamplingConfig(max_new_tokens=16),
        stop_fn=lambda ids: len(ids) >= 5,
        chunk=4,
    )
    for got, ref, reason in zip(out, full, stats["finish_reasons"], strict=True):
        if len(ref) >= 5:
            assert reason == "stop" and 5 <= len(got) <= 8 and got == ref[: len(got)]
        else:
            assert got == ref


def test_sample_logits_distribution():
    """top-k / top-p keep the right tokens with the right relative frequencies."""
    import jax

    logits = jax.numpy.log(jax.numpy.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    key = jax.random.key(0)
    top_p = np.asarray(sample_logits(logits, key, 1.0, 0, 0.6))
    assert set(top_p.tolist()) == {0, 1}
    assert abs((top_p == 0).mean() - 0.5 / 0.8) < 0.03
    top_k = np.asarray(sample_logits(logits, key, 1.0, 3, 1.0))
    assert set(top_k.tolist()) == {0, 1, 2}
    assert abs((top_k == 2).mean() - 0.15 / 0.95) < 0.03
    cold = np.asarray(sample_logits(logits, key, 0.05, 0, 1.0))
    assert (cold == 0).mean() > 0.99


def test_chat_template_rendering_matches_transformers(smollm2_gguf):
    tok = load_tokenizer(smollm2_gguf)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ref = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    ids = render_prompt(tok, "What is the capital of France?", chat=True)
    assert ids == list(ref)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    system = render_prompt(tok, "Hi", chat=True, system="Be brief.")
    assert tok.decode(system).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert cut_at_stop("Paris.\nQuestion: next", ["\nQuestion:", "."]) == ("Paris", True)
    assert cut_at_stop("Paris", ["\n"]) == ("Paris", False)
