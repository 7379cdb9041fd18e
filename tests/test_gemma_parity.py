"""Gemma 1/2/3 parity with transformers (torch, float32), HF round trips, config checks."""

import json

import numpy as np
import pytest
import transformers
from flax import nnx
from helpers import hf_gemma, torch_logits

import jaxtune
from jaxtune.errors import ConfigError
from jaxtune.models import abstract_model, param_count
from jaxtune.models.gemma import GemmaConfig
from jaxtune.verify import numpy_logits

VOCAB = 128


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager"
    ).eval()


GEMMA3_TYPES = ["sliding_attention"] * 5 + ["full_attention"]
CASES = {
    "gemma1_mqa": ("gemma", {}),
    "gemma1_mha_bias": ("gemma", {"num_key_value_heads": 4, "attention_bias": True}),
    "gemma2": (
        "gemma2",
        {
            "num_hidden_layers": 3,
            "num_key_value_heads": 2,
            "sliding_window": 5,
            "attn_logit_softcapping": 2.0,  # small caps so the tanh is far from linear
            "final_logit_softcapping": 3.0,
            "query_pre_attn_scalar": 24,
        },
    ),
    # 5 local : 1 global (HF's default pattern), distinct local/global RoPE bases and
    # linear scaling on the global layers.
    "gemma3": (
        "gemma3",
        {
            "num_hidden_layers": 6,
            "num_key_value_heads": 2,
            "sliding_window": 5,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        },
    ),
}


def test_gemma3_default_layer_types_are_five_local_one_global():
    cfg = transformers.Gemma3TextConfig(num_hidden_layers=6)
    assert cfg.layer_types == GEMMA3_TYPES


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_parity_with_transformers(case, scan, tmp_path):
    kind, over = CASES[case]
    path, ref_model = hf_gemma(kind, tmp_path, **over)
    model = jaxtune.from_pretrained(path, scan_layers=scan)
    rng = np.random.RandomState(0)
    ids = rng.randint(0, VOCAB, (3, 24))  # longer than the sliding windows (5)
    mask = np.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    ref = torch_logits(ref_model, ids)
    out = numpy_logits(model, ids)
    assert np.abs(ref).max() > 1.0  # a meaningful comparison, not near-zero logits
    assert np.abs(out - ref).max() <= 1e-4
    ref = torch_logits(ref_model, ids, mask)
    out = numpy_logits(model, ids, mask)
    valid = mask.astype(bool)
    assert np.abs(out[valid] - ref[valid]).max() <= 1e-4


def test_gemma3_config_from_hf():
    from jaxtune.hf.gemma import config_from_hf

    cfg_dict = json.loads(transformers.Gemma3TextConfig(**CASES["gemma3"][1]).to_json_string())

    cfg = config_from_hf(cfg_dict)
    assert cfg.windows == (5, 5, 5, 5, 5, 0)
    assert cfg.rope_ids == (1, 1, 1, 1, 1, 0)
    assert cfg.rope_local_theta == 100.0 and cfg.rope_theta == 1e6
    assert dict(cfg.rope_scaling) == {"rope_type": "linear", "factor": 4.0}
    assert cfg.qk_norm and cfg.sandwich_norms and cfg.attn_logit_softcapping is None


def test_pre_v5_gemma3_config_keys():
    """Older config.json files: rope_theta / rope_local_base_freq / sliding_window_pattern."""
    from jaxtune.hf.gemma import config_from_hf

    d = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 640,
        "intermediate_size": 2048,
        "num_hidden_layers": 18,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 256,
        "max_position_embeddings": 32768,
        "hidden_activation": "gelu_pytorch_tanh",
    }
    assert config_from_hf(d) == GemmaConfig.gemma3_270m(
        rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_through_save_pretrained(case, tmp_path):
    kind, over = CASES[case]
    path, _ = hf_gemma(kind, tmp_path, **over)
    model = jaxtune.from_pretrained(path)
    out = tmp_path / "export"
    jaxtune.save_pretrained(model, out)
    reloaded = load_hf(out)
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 16))
    assert np.abs(torch_logits(reloaded, ids) - numpy_logits(model, ids)).max() <= 1e-5
    again = jaxtune.from_pretrained(out)
    assert again.config == model.config
    assert np.array_equal(numpy_logits(again, ids), numpy_logits(model, ids))


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_kv_cache_decode_matches_full_forward(case, tmp_path):
    kind, over = CASES[case]
    path, _ = hf_gemma(kind, tmp_path, **over)
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
        ("gemma3", "use_bidirectional_attention", True, "use_bidirectional_attention"),
        ("gemma2", "rope_parameters", {"rope_type": "yarn", "factor": 2.0}, "rope type"),
        ("gemma2", "hidden_activation", "relu", "activation"),
        ("gemma3", "layer_types", ["sliding_attention", "chunked_attention"], "layer_types"),
        ("gemma2", "quantization_config", {"quant_method": "bitsandbytes"}, "quantization"),
    ],
)
def test_math_changing_fields_are_rejected(kind, field, value, match, tmp_path):
    path, _ = hf_gemma(kind, tmp_path)
    d = json.loads((path / "config.json").read_text())
    d[field] = value
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=match):
        jaxtune.from_pretrained(path)


def test_multimodal_gemma3_is_a_clear_error(tmp_path):
    path, _ = hf_gemma("gemma", tmp_path)
    d = json.loads((path / "config.json").read_text())
    d.update(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"])
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="gemma3_text"):
        jaxtune.from_pretrained(path)


@pytest.mark.parametrize(
    "preset, published",
    [
        ("gemma_2b", 2_506_172_416),
        ("gemma2_2b", 2_614_341_888),
        ("gemma2_9b", 9_241_705_984),
        ("gemma3_270m", 268_098_176),
    ],
)
def test_preset_parameter_counts(preset, published):
    cfg = getattr(GemmaConfig, preset)()
    assert param_count(abstract_model(cfg)) == published
