"""GPT-2 / GPT-Neo parity with transformers (torch, float32), HF round trips, config checks."""

import json

import numpy as np
import pytest
import safetensors.numpy
import transformers
from flax import nnx
from helpers import hf_gpt2, torch_logits

import jaxtune
from jaxtune.errors import ConfigError
from jaxtune.models import abstract_model, param_count
from jaxtune.models.gpt2 import GPT2Config
from jaxtune.verify import numpy_logits

VOCAB = 128


CASES = {
    "gpt2": ("gpt2", {}),
    "gpt2_untied_relu": ("gpt2", {"tie_word_embeddings": False, "activation_function": "relu"}),
    "gpt_neo": ("gpt_neo", {}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_parity_with_transformers(case, scan, tmp_path):
    kind, over = CASES[case]
    path, ref_model = hf_gpt2(kind, tmp_path, **over)
    model = jaxtune.from_pretrained(path, scan_layers=scan)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, VOCAB, (3, 24))  # longer than the GPT-Neo window (5)
    mask = np.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    ref = torch_logits(ref_model, ids)
    out = numpy_logits(model, ids)
    assert np.abs(ref).max() > 1.0
    assert np.abs(out - ref).max() <= 1e-4
    ref = torch_logits(ref_model, ids, mask)
    out = numpy_logits(model, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(out[valid] - ref[valid]).max() <= 1e-4


def test_gpt_neo_windows_and_unscaled_attention(tmp_path):
    path, _ = hf_gpt2("gpt_neo", tmp_path)
    cfg = jaxtune.from_pretrained(path).config
    assert cfg.windows == (0, 5, 5) and not cfg.scale_attn and not cfg.fused_qkv


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_through_save_pretrained(case, tmp_path):
    kind, over = CASES[case]
    path, _ = hf_gpt2(kind, tmp_path, **over)
    model = jaxtune.from_pretrained(path)
    out = tmp_path / "export"
    jaxtune.save_pretrained(model, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 16))
    assert np.abs(torch_logits(reloaded, ids) - numpy_logits(model, ids)).max() <= 1e-5
    again = jaxtune.from_pretrained(out)
    assert again.config == model.config
    assert np.array_equal(numpy_logits(again, ids), numpy_logits(model, ids))


def test_unprefixed_checkpoint_with_mask_buffers_loads(tmp_path):
    """The original hub GPT-2 file: no ``transformer.`` prefix, ``attn.bias`` buffers."""
    path, ref_model = hf_gpt2("gpt2", tmp_path)
    weights = safetensors.numpy.load_file(path / "model.safetensors")
    legacy = {k.removeprefix("transformer."): v for k, v in weights.items()}
    for i in range(2):
        legacy[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        legacy[f"h.{i}.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    safetensors.numpy.save_file(legacy, path / "model.safetensors")
    ids = np.random.RandomState(2).randint(0, VOCAB, (2, 10))
    model = jaxtune.from_pretrained(path)
    assert np.abs(numpy_logits(model, ids) - torch_logits(ref_model, ids)).max() <= 1e-4


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neo"])
def test_kv_cache_decode_matches_full_forward(kind, tmp_path):
    path, _ = hf_gpt2(kind, tmp_path)
    model = jaxtune.from_pretrained(path)
    ids = np.random.RandomState(3).randint(0, VOCAB, (2, 12))
    full = numpy_logits(model, ids)
    step = nnx.jit(lambda m, x, cache, i: m(x, None, cache=cache, cache_index=i))
    logits, cache = step(model, ids[:, :6], model.init_cache(2, 16), 0)
    steps = [np.asarray(logits)]
    for t in range(6, 12):
        logits, cache = step(model, ids[:, t : t + 1], cache, t)
        steps.append(np.asarray(logits))
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= 1e-5


@pytest.mark.parametrize(
    "kind, field, value, match",
    [
        ("gpt2", "scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
        ("gpt2", "add_cross_attention", True, "add_cross_attention"),
        ("gpt2", "activation_function", "gelu_10", "activation_function"),
        ("gpt_neo", "attention_types", [[["global", "sparse"], 1], [["local"], 1]], "attention"),
    ],
)
def test_math_changing_fields_are_rejected(kind, field, value, match, tmp_path):
    path, _ = hf_gpt2(kind, tmp_path)
    d = json.loads((path / "config.json").read_text())
    d[field] = value
    d.pop("attention_layers", None)  # GPT-Neo: derived from attention_types
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=match):
        jaxtune.from_pretrained(path)


@pytest.mark.parametrize(
    "preset, published",
    [("gpt2", 124_439_808), ("gpt2_medium", 354_823_168), ("gpt_neo_125m", 125_198_592)],
)
def test_preset_parameter_counts(preset, published):
    cfg = getattr(GPT2Config, preset)()
    assert param_count(abstract_model(cfg)) == published
