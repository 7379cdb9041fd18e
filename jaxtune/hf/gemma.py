"""HF <-> jaxtune for Gemma 1 (``gemma``), Gemma 2 (``gemma2``), Gemma 3 (``gemma3_text``).

One key table serves all three (their HF tensor names agree; a tensor a version lacks is
simply absent). ``config_from_hf`` rejects fields that would change the math in ways
the model does not implement, never ignoring them silently.

The ``(1 + w)`` norm weights are stored as HF stores them (w, zero-centred); GGUF files
store ``1 + w`` and must subtract 1 on import.
"""

from __future__ import annotations

import warnings

from jaxtune.errors import ConfigError
from jaxtune.hf.keymap import KeyMap, Rule
from jaxtune.hf.llama import HARMLESS as LLAMA_HARMLESS
from jaxtune.models.gemma import GemmaConfig

ARCHITECTURES = {
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
}
MODEL_TYPES = set(ARCHITECTURES.values())

HARMLESS = LLAMA_HARMLESS | {
    "hidden_activation",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "cache_implementation",
    "sliding_window_pattern",
    "_sliding_window_pattern",
    "rope_local_base_freq",
}
# Keys that change the math; rejected unless they hold the value we implement.
MATH_FIELDS = {
    "use_bidirectional_attention": False,
    "quantization_config": None,
    "rope_interleaved": False,
    "num_experts": None,
    "altup_num_inputs": None,  # Gemma 3n
    "laurel_rank": None,  # Gemma 3n
}
# HF activation names -> ours. Gemma 1's HF class maps a legacy "gelu" to the tanh
# approximation; Gemma 2/3 take ``hidden_activation`` literally.
TANH_GELU = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast"}
ROPE_TYPES = {"default", "linear"}


def _rules() -> list[Rule]:
    rules = [
        Rule("model.embed_tokens.weight", "embed_tokens/embedding"),
        Rule("model.norm.weight", "norm/scale"),
        Rule("lm_head.weight", "lm_head/kernel", "T"),
    ]
    norms = {
        "input_layernorm": "input_norm",
        "post_attention_layernorm": "post_attn_norm",
        "pre_feedforward_layernorm": "pre_mlp_norm",
        "post_feedforward_layernorm": "post_mlp_norm",
        "self_attn.q_norm": "attn/q_norm",
        "self_attn.k_norm": "attn/k_norm",
    }
    for hf, ours in norms.items():
        rules.append(Rule(f"model.layers.{{i}}.{hf}.weight", f"layers/{ours}/scale"))
    for p in ("q", "k", "v", "o"):
        hf = f"model.layers.{{i}}.self_attn.{p}_proj"
        rules.append(Rule(f"{hf}.weight", f"layers/attn/{p}_proj/kernel", "T"))
        rules.append(Rule(f"{hf}.bias", f"layers/attn/{p}_proj/bias"))
    for p in ("gate", "up", "down"):
        rules.append(
            Rule(f"model.layers.{{i}}.mlp.{p}_proj.weight", f"layers/mlp/{p}_proj/kernel", "T")
        )
    return rules


KEYMAP = KeyMap(_rules())
# HF tensors that carry no weights we need (buffers saved by old transformers versions).
IGNORED = ("rotary_emb.inv_freq",)


def _reject(d: dict, source: str) -> None:
    for key, ok in MATH_FIELDS.items():
        if key in d and d[key] is not None and d[key] != ok:
            raise ConfigError(
                f"{source}: field {key!r} = {d[key]!r} changes the model's math and is not "
                f"supported (expected {ok!r} or absent)"
            )
    unknown = sorted(set(d) - HARMLESS - set(MATH_FIELDS))
    if unknown:
        warnings.warn(f"{source}: ignoring config fields {unknown}", stacklevel=3)


def _activation(d: dict, mtype: str, source: str) -> str:
    if mtype == "gemma":
        name = d.get("hidden_act") or "gelu_pytorch_tanh"
        ok = TANH_GELU | {"gelu"}
    else:
        name = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        ok = TANH_GELU | {"gelu"}
    if name not in ok:
        raise ConfigError(
            f"{source}: activation {name!r} is not supported (expected one of {sorted(ok)})"
        )
    return "gelu" if name == "gelu" and mtype != "gemma" else "gelu_tanh"


def _rope_one(rope: dict | None, default_theta: float, source: str, what: str):
    """(theta, hashable scaling or None) of one HF rope-parameters dict."""
    rope = dict(rope or {})
    theta = float(rope.get("rope_theta", default_theta))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(
            f"{source}: {what} rope type {kind!r} is not supported (supported: {sorted(ROPE_TYPES)})"
        )
    if kind == "default":
        return theta, None
    keep = {k: v for k, v in rope.items() if k not in ("rope_theta", "type")}
    keep["rope_type"] = kind
    return theta, tuple(sorted(keep.items()))


def _ropes(d: dict, mtype: str, source: str):
    """(global theta, global scaling, local theta or None)."""
    params = d.get("rope_parameters")
    if mtype != "gemma3_text":
        rope = params or d.get("rope_scaling") or {}
        theta, scaling = _rope_one(rope, d.get("rope_theta", 10000.0), source, "the")
        return theta, scaling, None
    if params and ("full_attention" in params or "sliding_attention" in params):
        full, local = params.get("full_attention"), params.get("sliding_attention")
    else:  # pre-5.0 layout: rope_theta / rope_scaling global, rope_local_base_freq local
        full = {**(d.get("rope_scaling") or {}), **(params or {})}
        local = {"rope_type": "default"}
        if "rope_local_base_freq" in d:
            local["rope_theta"] = d["rope_local_base_freq"]
    theta, scaling = _rope_one(full, d.get("rope_theta", 1_000_000.0), source, "full_attention")
    local_theta, local_scaling = _rope_one(local, 10_000.0, source, "sliding_attention")
    if local_scaling is not None:
        raise ConfigError(f"{source}: RoPE scaling on sliding-window layers is not supported")
    return theta, scaling, local_theta


def _windows(d: dict, mtype: str, n_layers: int, source: str) -> tuple[int, ...] | None:
    if mtype == "gemma":
        return None
    every = 2 if mtype == "gemma2" else int(d.get("sliding_window_pattern") or 6)
    types = d.get("layer_types") or [
        "sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)
    ]
    if len(types) != n_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ConfigError(
            f"{source}: layer_types must list 'sliding_attention' / 'full_attention' for "
            f"each of the {n_layers} layers"
        )
    window = d.get("sliding_window")
    if "sliding_attention" in types and not window:
        raise ConfigError(f"{source}: sliding_attention layers need a sliding_window")
    return tuple(int(window) if t == "sliding_attention" else 0 for t in types)


def config_from_hf(d: dict, source: str = "config.json") -> GemmaConfig:
    """Translates an HF config dict into :class:`GemmaConfig` (errors name ``source``)."""
    archs = d.get("architectures") or []
    mtype = d.get("model_type")
    if archs and not any(a in ARCHITECTURES for a in archs):
        raise ConfigError(
            f"{source}: architecture {archs[0]!r} is not supported by the gemma family "
            f"(supported: {sorted(ARCHITECTURES)})"
        )
    if mtype not in MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {mtype!r} is not a Gemma text model")
    _reject(d, source)
    act = _activation(d, mtype, source)
    theta, scaling, local_theta = _ropes(d, mtype, source)
    try:
        n_heads = d["num_attention_heads"]
        n_layers = d["num_hidden_layers"]
        windows = _windows(d, mtype, n_layers, source)
        later = mtype != "gemma"  # Gemma 2/3 features
        return GemmaConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            hidden_act=act,
            rope_theta=theta,
            rope_scaling=scaling,
            rope_local_theta=local_theta,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256) if later else None,
            attn_logit_softcapping=d.get("attn_logit_softcapping") if later else None,
            final_logit_softcapping=d.get("final_logit_softcapping") if later else None,
            sandwich_norms=later,
            qk_norm=mtype == "gemma3_text",
            attention_bias=bool(d.get("attention_bias", False)),
            sliding_window=max(windows) if windows and any(windows) else None,
            layer_windows=windows,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(d["eos_token_id"])
            if isinstance(d.get("eos_token_id"), list)
            else d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            family=mtype,
        )
    except KeyError as e:
        raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None


def _rope_dict(theta: float, scaling) -> dict:
    if scaling:
        return {**dict(scaling), "rope_theta": theta}
    return {"rope_type": "default", "rope_theta": theta}


def config_to_hf(cfg: GemmaConfig) -> dict:
    """HF ``config.json`` dict that transformers loads into the same architecture."""
    mtype = cfg.family if cfg.family in MODEL_TYPES else "gemma"
    act = "gelu_pytorch_tanh" if cfg.hidden_act == "gelu_tanh" else "gelu"
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
        "rms_norm_eps": cfg.rms_norm_eps,
        "attention_bias": cfg.attention_bias,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id)
        if isinstance(cfg.eos_token_id, tuple)
        else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    if mtype == "gemma":
        if cfg.sandwich_norms or cfg.qk_norm or any(cfg.windows) or cfg.rope_local_theta:
            raise ConfigError("gemma export: this config uses Gemma 2/3 features")
        if cfg.attn_logit_softcapping or cfg.final_logit_softcapping:
            raise ConfigError("gemma export: Gemma 1 has no logit soft-capping")
        if cfg.query_pre_attn_scalar not in (None, cfg.head_dim):
            raise ConfigError("gemma export: Gemma 1 scales attention by 1/sqrt(head_dim)")
        if cfg.hidden_act != "gelu_tanh":  # HF Gemma 1 reads any "gelu" as the tanh form
            raise ConfigError("gemma export: Gemma 1 in transformers only has tanh-GELU")
        d["hidden_act"] = act
        d["rope_parameters"] = _rope_dict(cfg.rope_theta, cfg.rope_scaling)
        return d
    windows = cfg.windows
    sliding = max(windows) if any(windows) else None
    if any(w not in (0, sliding) for w in windows):
        raise ConfigError(f"{mtype} export: every sliding layer must share one window size")
    d.update(
        hidden_activation=act,
        query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
        attn_logit_softcapping=cfg.attn_logit_softcapping,
        final_logit_softcapping=cfg.final_logit_softcapping,
        # HF needs a window value even if every layer is global.
        sliding_window=sliding or cfg.max_position_embeddings,
        layer_types=["sliding_attention" if w else "full_attention" for w in windows],
    )
    if mtype == "gemma2":
        if cfg.qk_norm or cfg.rope_local_theta is not None:
            raise ConfigError("gemma2 export: this config uses Gemma 3 features")
        d["rope_parameters"] = _rope_dict(cfg.rope_theta, cfg.rope_scaling)
    else:
        local = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
        d["rope_parameters"] = {
            "full_attention": _rope_dict(cfg.rope_theta, cfg.rope_scaling),
            "sliding_attention": _rope_dict(local, None),
        }
    return d
