"""GGUF -> Hugging Face for llama.cpp's ``gemma3`` architecture (Gemma 3 text models).

What differs from the ``llama`` mapping, each checked against transformers' own GGUF
loader (``modeling_gguf_pytorch_utils.Gemma2TensorProcessor``) on the real 270M file:

* llama.cpp's converter stores every RMSNorm weight as ``1 + w`` (its norm multiplies by
  the weight as is); HF Gemma keeps ``w`` and computes ``(1 + w)`` in the forward, so 1
  is subtracted here.
* q/k rows are *not* permuted: llama.cpp runs Gemma with NEOX-style (rotate-half) RoPE.
* Facts llama.cpp hard-codes rather than writes are restored with its values: local
  (sliding-window) layers use RoPE base 10000, every 6th layer is global, and the score
  scale is ``1/sqrt(head_dim)`` except for the 62-layer 27B model (``hidden / heads``).
* A file without ``tokenizer.chat_template`` (the base 270M GGUF has none) gets Gemma 3's
  text-only chat template, and ``<end_of_turn>`` joins ``<eos>`` as an end token, as in
  Google's ``generation_config.json``.
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFValueType

from jaxtune.gguf.arch import (
    DECODER_TENSORS,
    Arch,
    ExportArch,
    Meta,
    decoder_dims,
    decoder_kv,
    token_ids,
)

LOCAL_ROPE_THETA = 10_000.0  # llama.cpp: rope_freq_base_train_swa for gemma3
SLIDING_WINDOW_PATTERN = 6  # llama.cpp: set_swa_pattern(6); every 6th layer is global
END_OF_TURN = "<end_of_turn>"

# Gemma 3's chat template (Google's tokenizer_config.json) without its image branch: a
# system message is folded into the first user turn; "assistant" is spelled "model".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)


def _rope(meta: Meta, theta: float) -> dict:
    a = meta.arch
    kind = meta.get(f"{a}.rope.scaling.type", "none")
    if kind == "linear":  # Gemma 3 4B and larger: factor 8 on the global layers
        return {
            "rope_type": "linear",
            "rope_theta": theta,
            "factor": float(meta.require(f"{a}.rope.scaling.factor")),
        }
    if kind != "none":
        raise meta.fail(f"rope scaling {kind!r} is not supported (supported: linear)")
    return {"rope_type": "default", "rope_theta": theta}


def _layer_types(meta: Meta, n_layers: int) -> list[str]:
    # Newer llama.cpp files may spell the pattern out: an int period or one bool per layer.
    pattern = meta.get(f"{meta.arch}.attention.sliding_window_pattern", SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise meta.fail(f"sliding_window_pattern lists {len(pattern)} layers, not {n_layers}")
        sliding = [bool(p) for p in pattern]
    elif isinstance(pattern, int) and pattern > 0:
        sliding = [(i + 1) % pattern != 0 for i in range(n_layers)]
    else:
        raise meta.fail(f"sliding_window_pattern {pattern!r} is not a positive int or bool list")
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _end_of_turn_id(meta: Meta) -> int | None:
    tokens = meta.get("tokenizer.ggml.tokens") or []
    return tokens.index(END_OF_TURN) if END_OF_TURN in tokens else None


def _gemma3_config(meta: Meta) -> dict:
    a = meta.arch
    dims = decoder_dims(meta)
    n_layers = dims["num_hidden_layers"]
    theta = float(meta.get(f"{a}.rope.freq_base", 1_000_000.0))
    config = {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        **dims,
        "rms_norm_eps": float(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_parameters": {
            "full_attention": _rope(meta, theta),
            "sliding_attention": {"rope_type": "default", "rope_theta": LOCAL_ROPE_THETA},
        },
        "sliding_window": int(meta.require(f"{a}.attention.sliding_window")),
        "layer_types": _layer_types(meta, n_layers),
        # llama.cpp's f_attention_scale for gemma3 (the 27B model is the 62-layer one).
        "query_pre_attn_scalar": (
            dims["hidden_size"] // dims["num_attention_heads"]
            if n_layers == 62
            else dims["head_dim"]
        ),
        "attn_logit_softcapping": meta.get(f"{a}.attn_logit_softcapping"),
        "final_logit_softcapping": meta.get(f"{a}.final_logit_softcapping"),
        "max_position_embeddings": int(meta.get(f"{a}.context_length", 32768)),
        "tie_word_embeddings": "output.weight" not in meta.tensors,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
    }
    config.update(token_ids(meta))
    eot = _end_of_turn_id(meta)
    if eot is not None and config.get("eos_token_id") not in (None, eot):
        config["eos_token_id"] = [config["eos_token_id"], eot]
    return config


def _gemma_fix(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    # Every Gemma norm (input/post/pre-FFN/post-FFN, q/k, final) is stored as 1 + w.
    return w - 1.0 if name.endswith("norm.weight") else w


_GEMMA3_TENSORS = {
    **DECODER_TENSORS,
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}

ARCHS = {
    "gemma3": Arch(_gemma3_config, _GEMMA3_TENSORS, _gemma_fix, chat_template=CHAT_TEMPLATE),
}


# --------------------------------------------------------------------------- export


def _check_gemma3(config: dict) -> None:
    """What llama.cpp's gemma3 graph hard-codes (see the module docstring) must hold."""
    n_layers = config["num_hidden_layers"]
    want = _layer_pattern(n_layers)
    if config.get("layer_types", want) != want:
        raise ValueError(
            f"layer_types: llama.cpp makes every {SLIDING_WINDOW_PATTERN}th layer global and "
            "the others sliding"
        )
    scale = config.get("query_pre_attn_scalar", config["head_dim"])
    fixed = (
        config["hidden_size"] // config["num_attention_heads"]
        if n_layers == 62
        else config["head_dim"]
    )
    if scale != fixed:
        raise ValueError(f"query_pre_attn_scalar {scale} (llama.cpp uses {fixed} here)")
    rope = config.get("rope_parameters") or {}
    local = rope.get("sliding_attention", {})
    if (
        local.get("rope_type", "default") != "default"
        or local.get("rope_theta", LOCAL_ROPE_THETA) != LOCAL_ROPE_THETA
    ):
        raise ValueError(f"sliding-layer RoPE must be the default with base {LOCAL_ROPE_THETA:g}")
    if rope.get("full_attention", {}).get("rope_type", "default") not in ("default", "linear"):
        raise ValueError("global-layer rope_type must be default or linear")
    if config.get("attn_logit_softcapping"):
        raise ValueError("attn_logit_softcapping (Gemma 3 has none; llama.cpp ignores it)")
    if config.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError("hidden_activation must be gelu_pytorch_tanh")
    if config.get("attention_bias"):
        raise ValueError("attention_bias (llama.cpp's gemma3 graph has none)")


def _layer_pattern(n_layers: int) -> list[str]:
    return [
        "full_attention" if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
        for i in range(n_layers)
    ]


def _gemma3_kv(config: dict) -> list:
    full = (config.get("rope_parameters") or {}).get("full_attention", {})
    rows = decoder_kv("gemma3", config) + [
        ("gemma3.rope.freq_base", full.get("rope_theta", 1_000_000.0), GGUFValueType.FLOAT32, None),
        ("gemma3.attention.sliding_window", config["sliding_window"], GGUFValueType.UINT32, None),
    ]
    if full.get("rope_type") == "linear":
        rows += [
            ("gemma3.rope.scaling.type", "linear", GGUFValueType.STRING, None),
            ("gemma3.rope.scaling.factor", full["factor"], GGUFValueType.FLOAT32, None),
        ]
    if config.get("final_logit_softcapping"):
        cap = config["final_logit_softcapping"]
        rows.append(("gemma3.final_logit_softcapping", cap, GGUFValueType.FLOAT32, None))
    return rows


EXPORTS = {
    "gemma3_text": ExportArch(
        arch="gemma3",
        check=_check_gemma3,
        kv=_gemma3_kv,
        tensors=_GEMMA3_TENSORS,
        # llama.cpp's norm multiplies by the stored weight: store HF's 1 + w.
        fix=lambda name, w, config: w + 1.0 if name.endswith("norm.weight") else w,
    ),
}
