"""Llama-family parity with transformers (torch, float32) and HF round trips."""

import json

import numpy as np
import pytest
import torch
import transformers
from helpers import torch_logits

import jaxtune
from jaxtune.verify import numpy_logits

VOCAB = 128


def hf_model(kind: str, tmp_path, **over):
    """A tiny random HF model saved with save_pretrained; returns (dir, torch model)."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    common.update(over)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common)
        model = transformers.MistralForCausalLM(cfg)
    else:
        raise ValueError(kind)
    # Random init leaves biases / norms at trivial values; perturb so they are tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / kind
    model.save_pretrained(out)
    return out, model.eval()


CASES = {
    "llama_mha": ("llama", {}),
    "llama_gqa": ("llama", {"num_key_value_heads": 2}),
    "llama_mqa": ("llama", {"num_key_value_heads": 1}),
    "llama3_rope_scaling": (
        "llama",
        {
            "num_key_value_heads": 2,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            "rope_theta": 500000.0,
        },
    ),
    "llama_tied": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 2}),
    "llama_attention_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "qwen2_bias": ("qwen2", {"num_key_value_heads": 2}),
    "mistral_sliding": ("mistral", {"num_key_value_heads": 2, "sliding_window": 7, "head_dim": 16}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_parity_with_transformers(case, scan, tmp_path):
    kind, over = CASES[case]
    path, ref_model = hf_model(kind, tmp_path, **over)
    model = jaxtune.from_pretrained(path, scan_layers=scan)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, VOCAB, (3, 24))  # longer than the Mistral window (7)
    mask = np.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    # Without a mask.
    ref = torch_logits(ref_model, ids)
    out = numpy_logits(model, ids)
    assert np.abs(out - ref).max() <= 1e-4
    # With a padding mask: compare the real (unpadded) positions.
    ref = torch_logits(ref_model, ids, mask)
    out = numpy_logits(model, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(out[valid] - ref[valid]).max() <= 1e-4


@pytest.mark.parametrize("case", ["llama_gqa", "llama_tied", "qwen2_bias", "mistral_sliding"])
def test_round_trip_through_save_pretrained(case, tmp_path):
    kind, over = CASES[case]
    path, _ = hf_model(kind, tmp_path, **over)
    model = jaxtune.from_pretrained(path)
    out = tmp_path / "export"
    jaxtune.save_pretrained(model, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 16))
    assert np.abs(torch_logits(reloaded, ids) - numpy_logits(model, ids)).max() <= 1e-5
    # And back into jaxtune: same parameters bit for bit.
    again = jaxtune.from_pretrained(out)
    assert np.array_equal(numpy_logits(again, ids), numpy_logits(model, ids))


def test_sharded_export_and_import(tmp_path):
    from jaxtune.hf.io import save_hf

    path, ref_model = hf_model("llama", tmp_path, num_key_value_heads=2)
    model = jaxtune.from_pretrained(path)
    out = tmp_path / "sharded"
    save_hf(model, out, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    reloaded = jaxtune.from_pretrained(out)
    ids = np.random.RandomState(2).randint(0, VOCAB, (2, 8))
    assert np.array_equal(numpy_logits(reloaded, ids), numpy_logits(model, ids))
    hf_reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(torch_logits(hf_reloaded, ids) - numpy_logits(model, ids)).max() <= 1e-5


def test_kv_cache_decode_matches_full_forward(tmp_path):
    path, _ = hf_model("mistral", tmp_path, num_key_value_heads=2, sliding_window=5, head_dim=16)
    model = jaxtune.from_pretrained(path)
    ids = np.random.RandomState(3).randint(0, VOCAB, (2, 12))
    full = numpy_logits(model, ids)
    cache = model.init_cache(2, 16)
    logits, cache = model(ids[:, :6], None, cache=cache, cache_index=0)
    steps = [np.asarray(logits)]
    for t in range(6, 12):
        logits, cache = model(ids[:, t : t + 1], None, cache=cache, cache_index=t)
        steps.append(np.asarray(logits))
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= 1e-5
