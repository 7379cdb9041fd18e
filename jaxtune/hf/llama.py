"""HF <-> jaxtune for the Llama family (Llama, Mistral, Qwen2; TinyLlama, SmolLM2).

``config_from_hf`` translates ``config.json`` and rejects fields that would change the
math in ways our model does not implement (never silently ignored).
"""

from __future__ import annotations

import warnings

from jaxtune.errors import ConfigError
from jaxtune.hf.keymap import KeyMap, Rule
from jaxtune.models.llama import LlamaConfig

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
MODEL_TYPES = {"llama", "mistral", "qwen2"}

# Keys a PretrainedConfig carries that do not affect the forward pass.
HARMLESS = {
    "transformers_version",
    "architectures",
    "torch_dtype",
    "dtype",
    "use_cache",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "id2label",
    "label2id",
    "problem_type",
    "initializer_range",
    "_name_or_path",
    "model_type",
    "tokenizer_class",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "attention_dropout",
    "torchscript",
    "pretraining_tp",
    "max_window_layers",
    "use_sliding_window",
    "layer_types",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "max_position_embeddings",
    "tie_word_embeddings",
    "head_dim",
    "sliding_window",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
    "rms_norm_eps",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "transformers.js_config",
    "is_llama_config",
    "embd_pdrop",
    "resid_pdrop",
    "tf_legacy_loss",
    "use_bfloat16",
    "task_specific_params",
    "prefix",
    "finetuning_task",
    "cross_attention_hidden_size",
    "add_cross_attention",
    "tie_encoder_decoder",
    "decoder_start_token_id",
    "sep_token_id",
    "bad_words_ids",
    "begin_suppress_tokens",
    "suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "auto_map",
}
# Keys that change the math; rejected unless they hold the value we implement.
MATH_FIELDS = {
    "rope_interleaved": False,
    "quantization_config": None,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "num_experts": None,
    "num_local_experts": None,
    "use_qk_norm": False,
    "qk_layernorm": False,
    "no_rope_layers": None,
    "logits_scaling": None,
    "residual_multiplier": None,
    "embedding_multiplier": None,
}
ROPE_TYPES = {"default", "linear", "llama3"}


def _rules() -> list[Rule]:
    rules = [
        Rule("model.embed_tokens.weight", "embed_tokens/embedding"),
        Rule("model.norm.weight", "norm/scale"),
        Rule("lm_head.weight", "lm_head/kernel", "T"),
        Rule("model.layers.{i}.input_layernorm.weight", "layers/input_norm/scale"),
        Rule("model.layers.{i}.post_attention_layernorm.weight", "layers/post_attn_norm/scale"),
    ]
    for p in ("q", "k", "v", "o"):
        rules.append(
            Rule(
                f"model.layers.{{i}}.self_attn.{p}_proj.weight", f"layers/attn/{p}_proj/kernel", "T"
            )
        )
        rules.append(
            Rule(f"model.layers.{{i}}.self_attn.{p}_proj.bias", f"layers/attn/{p}_proj/bias")
        )
    for p in ("gate", "up", "down"):
        rules.append(
            Rule(f"model.layers.{{i}}.mlp.{p}_proj.weight", f"layers/mlp/{p}_proj/kernel", "T")
        )
        rules.append(Rule(f"model.layers.{{i}}.mlp.{p}_proj.bias", f"layers/mlp/{p}_proj/bias"))
    return rules


KEYMAP = KeyMap(_rules())
# HF tensors that carry no weights we need (buffers saved by old transformers versions).
IGNORED = ("rotary_emb.inv_freq",)


def _rope(d: dict, source: str) -> tuple[float, tuple | None]:
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    if kind not in ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type {kind!r} is not supported (supported: {sorted(ROPE_TYPES)})"
        )
    if kind == "default":
        return theta, None
    keep = {k: v for k, v in rope.items() if k not in ("rope_theta", "type")}
    keep["rope_type"] = kind
    return theta, tuple(sorted(keep.items()))


def config_from_hf(d: dict, source: str = "config.json") -> LlamaConfig:
    """Translates an HF config dict into :class:`LlamaConfig` (errors name ``source``)."""
    archs = d.get("architectures") or []
    mtype = d.get("model_type")
    if archs and not any(a in ARCHITECTURES for a in archs):
        raise ConfigError(
            f"{source}: architecture {archs[0]!r} is not supported by the llama family "
            f"(supported: {sorted(ARCHITECTURES)})"
        )
    if mtype not in MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {mtype!r} is not a llama-family model")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(
            f"{source}: hidden_act {d['hidden_act']!r} is not supported (expected 'silu')"
        )
    for key, ok in MATH_FIELDS.items():
        if key in d and d[key] not in (ok, None) and d[key] != ok:
            raise ConfigError(
                f"{source}: field {key!r} = {d[key]!r} changes the model's math and is not "
                f"supported (expected {ok!r} or absent)"
            )
    unknown = sorted(set(d) - HARMLESS - set(MATH_FIELDS))
    if unknown:
        warnings.warn(f"{source}: ignoring config fields {unknown}", stacklevel=2)
    theta, scaling = _rope(d, source)
    n_heads = d["num_attention_heads"]
    n_layers = d["num_hidden_layers"]
    windows = None
    sliding = d.get("sliding_window")
    if mtype == "qwen2":
        if d.get("use_sliding_window") and sliding:
            types = d.get("layer_types") or [
                "sliding_attention"
                if i >= d.get("max_window_layers", n_layers)
                else "full_attention"
                for i in range(n_layers)
            ]
            windows = tuple(sliding if t == "sliding_attention" else 0 for t in types)
        sliding = None
    elif mtype == "llama":
        sliding = None
    try:
        return LlamaConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=bool(d.get("attention_bias", False)) or mtype == "qwen2",
            o_bias=bool(d.get("attention_bias", False)) and mtype == "llama",
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=sliding,
            layer_windows=windows,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(d["eos_token_id"])
            if isinstance(d.get("eos_token_id"), list)
            else d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            family=mtype,
        )
    except KeyError as e:
        raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None


def config_to_hf(cfg: LlamaConfig) -> dict:
    """HF ``config.json`` dict that transformers loads into the same architecture."""
    mtype = cfg.family if cfg.family in MODEL_TYPES else "llama"
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**dict(cfg.rope_scaling), "rope_theta": cfg.rope_theta}
    d = {
        "architectures": [{v: k for k, v in ARCHITECTURES.items()}[mtype]],
        "model_type": mtype,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id)
        if isinstance(cfg.eos_token_id, tuple)
        else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    if mtype == "llama":
        d["attention_bias"] = cfg.qkv_bias
        d["mlp_bias"] = cfg.mlp_bias
    if mtype == "mistral":
        d["sliding_window"] = cfg.sliding_window
    if mtype == "qwen2":
        windows = cfg.windows
        sliding = max(windows) if any(windows) else None
        d["use_sliding_window"] = sliding is not None
        d["sliding_window"] = sliding
        d["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windows]
        d["max_window_layers"] = cfg.num_layers
    return d
