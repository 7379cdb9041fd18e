"""HF <-> jaxtune for GPT-Neo (``gpt_neo``); the model is :mod:`jaxtune.models.gpt2`.

Its own key table because GPT-Neo uses ``nn.Linear`` ([out, in], transform ``T``)
where GPT-2 has ``Conv1D`` under the same tensor names. ``attention_types`` (e.g.
``[[["global", "local"], 6]]``) becomes per-layer windows: ``window_size`` on local
layers, 0 on global ones.
"""

from __future__ import annotations

from jaxtune.errors import ConfigError
from jaxtune.hf.gpt2 import (
    COMMON_HARMLESS,
    PrefixedKeyMap,
    block_rules,
    check_activation,
    check_fields,
    common_to_hf,
    eos,
)
from jaxtune.models.gpt2 import GPT2Config

ARCHITECTURES = {"GPTNeoForCausalLM", "GPTNeoModel"}

HARMLESS = COMMON_HARMLESS | {
    "num_layers",
    "num_heads",
    "attention_types",
    "attention_layers",
    "window_size",
    "activation_function",
    "layer_norm_epsilon",
    "resid_dropout",
    "embed_dropout",
    "classifier_dropout",
    "gradient_checkpointing",
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
}
MATH_FIELDS = {"quantization_config": None}

_ATTN = {
    "attention.q_proj": "q_proj",
    "attention.k_proj": "k_proj",
    "attention.v_proj": "v_proj",
    "attention.out_proj": "out_proj",
}
KEYMAP = PrefixedKeyMap(block_rules(_ATTN, "T"), prefix="transformer.")
# Causal-mask buffers that old transformers versions saved with the weights.
IGNORED = (".attention.bias", ".attention.masked_bias")


def _layer_types(d: dict, n_layers: int, source: str) -> list[str]:
    types = d.get("attention_layers")
    if not types:
        types = []
        for kinds, repeat in d.get("attention_types") or [[["global", "local"], n_layers // 2]]:
            types.extend(list(kinds) * int(repeat))
    if len(types) != n_layers or set(types) - {"global", "local"}:
        raise ConfigError(
            f"{source}: attention_types must give 'global' / 'local' for each of the "
            f"{n_layers} layers (got {types})"
        )
    return types


def config_from_hf(d: dict, source: str = "config.json") -> GPT2Config:
    """Translates an HF GPT-Neo config dict into :class:`GPT2Config`."""
    archs = d.get("architectures") or []
    if archs and not any(a in ARCHITECTURES for a in archs):
        raise ConfigError(
            f"{source}: architecture {archs[0]!r} is not supported by the gpt_neo family "
            f"(supported: {sorted(ARCHITECTURES)})"
        )
    if d.get("model_type") != "gpt_neo":
        raise ConfigError(f"{source}: model_type {d.get('model_type')!r} is not 'gpt_neo'")
    check_fields(d, source, HARMLESS, MATH_FIELDS)
    try:
        hidden = d["hidden_size"]
        n_layers = d["num_layers"]
        window = int(d.get("window_size", 256))
        types = _layer_types(d, n_layers, source)
        return GPT2Config(
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d.get("intermediate_size") or 4 * hidden,
            num_layers=n_layers,
            num_heads=d["num_heads"],
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            layer_norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
            activation=check_activation(d.get("activation_function", "gelu_new"), source),
            fused_qkv=False,
            scale_attn=False,
            layer_windows=tuple(window if t == "local" else 0 for t in types),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos(d),
            pad_token_id=d.get("pad_token_id"),
            family="gpt_neo",
        )
    except KeyError as e:
        raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None


def config_to_hf(cfg: GPT2Config) -> dict:
    """HF ``config.json`` dict that transformers loads into the same architecture."""
    windows = cfg.windows
    window = max(windows) if any(windows) else 256
    if cfg.fused_qkv or cfg.scale_attn or any(w not in (0, window) for w in windows):
        raise ConfigError("gpt_neo export: config is not a GPT-Neo architecture")
    # One [[type], 1] entry per layer: exact for any pattern of local / global layers.
    types = [[["local" if w else "global"], 1] for w in windows]
    return {
        "architectures": ["GPTNeoForCausalLM"],
        "model_type": "gpt_neo",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_types": types,
        "window_size": window,
        **common_to_hf(cfg),
    }
