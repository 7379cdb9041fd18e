"""llama.cpp's ``llama`` (Llama 2/3, Mistral, SmolLM2) and ``qwen2`` architectures, both ways.

llama.cpp stores ``llama`` q/k projection rows permuted for its interleaved RoPE (undone on
import, redone on export) and Llama 3.1+ rope scaling as a ``rope_freqs.weight`` tensor
(HF's ``rope_type: llama3`` parameters). ``qwen2`` runs rotate-half (NEOX) RoPE, so its
rows are stored as HF has them, with q/k/v biases.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGUFValueType

from jaxtune.gguf.arch import (
    DECODER_TENSORS,
    Arch,
    ExportArch,
    Meta,
    decoder_dims,
    decoder_kv,
    dequantize,
    token_ids,
)


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverts llama.cpp's q/k row permutation (interleaved RoPE -> HF rotate-half).

    convert_hf_to_gguf.py stores ``w.reshape(n_head, 2, d // 2, in).swapaxes(1, 2)``; swapping
    the same axes of the ``(n_head, d // 2, 2, in)`` view restores HF's order exactly.

    Args:
        w: [n_head * head_dim, in_features] projection weight as stored in the GGUF.
        n_head: heads in this projection (query heads for q, key/value heads for k).

    Returns:
        [n_head * head_dim, in_features] weight in HF layout.
    """
    out = w.shape[0]
    half = out // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp's interleaved order (inverse of
    :func:`_unpermute_rows`): ``w.reshape(n_head, 2, d // 2, in).swapaxes(1, 2)``."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_fix(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    for proj, heads in (("q_proj", "num_attention_heads"), ("k_proj", "num_key_value_heads")):
        if name.endswith(f"self_attn.{proj}.weight"):
            # A wrong head count would still reshape cleanly and silently scramble rows.
            if w.shape[0] != config[heads] * config["head_dim"]:
                raise ValueError(f"expected {config[heads]} x {config['head_dim']} rows")
            return _unpermute_rows(w, config[heads])
    return w


def _llama3_factors(params: dict, inv_freq: np.ndarray) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` (per-frequency divisors) for HF llama3 rope parameters."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))


def _llama3_rope(meta: Meta, theta: float, head_dim: int) -> dict | None:
    """Recovers HF ``rope_type: llama3`` parameters from a ``rope_freqs.weight`` tensor.

    llama.cpp writes Llama 3.1+ rope scaling as that tensor, not as metadata. Its mid band
    is linear in 1 / wavelength; with ``low_freq_factor = 1`` (Meta's value) the slope and
    intercept give the rest. The result is checked by recomputing the tensor.
    """
    f = dequantize(meta.path, meta.tensors["rope_freqs.weight"]).astype(np.float64).ravel()
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if f.shape != inv_freq.shape:
        raise meta.fail(f"rope_freqs.weight has {f.size} entries, expected {inv_freq.size}")
    if np.allclose(f, 1.0):
        return None
    factor = float(f.max())
    mid = (f > 1 + 1e-5) & (f < factor * (1 - 1e-5))
    params = None
    slope = intercept = 0.0
    if mid.sum() >= 2:
        smooth = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(inv_freq[mid] / (2 * math.pi), smooth, 1)
    if slope > 0 > intercept:  # the signs llama3's smooth = (old / wavelen - 1) / (high - 1) has
        params = {
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": float(f"{factor:.6g}"),
            "low_freq_factor": 1.0,
            "high_freq_factor": float(f"{1 - 1 / intercept:.6g}"),
            "original_max_position_embeddings": int(round(-slope / intercept)),
        }
    if params is None or not np.allclose(_llama3_factors(params, inv_freq), f, rtol=1e-4):
        raise meta.fail("rope_freqs.weight does not match llama3 rope scaling; not supported")
    return params


def _llama_rope(meta: Meta, theta: float, head_dim: int) -> dict:
    a = meta.arch
    kind = meta.get(f"{a}.rope.scaling.type", "none")
    linear = meta.get(f"{a}.rope.scale_linear")  # older llama.cpp spelling
    if kind == "none" and linear not in (None, 1.0):
        kind, factor = "linear", linear
    elif kind == "linear":
        factor = meta.require(f"{a}.rope.scaling.factor")
    elif kind != "none":
        raise meta.fail(f"rope scaling {kind!r} is not supported (supported: linear, llama3)")
    if "rope_freqs.weight" in meta.tensors:
        if kind != "none":
            raise meta.fail(f"both rope_freqs.weight and rope scaling {kind!r} are set")
        return _llama3_rope(meta, theta, head_dim) or {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": float(factor)}
    return {"rope_type": "default", "rope_theta": theta}


def _decoder_config(meta: Meta, model_type: str, rope: dict, context: int) -> dict:
    """The HF config both architectures share; ``rope``: HF ``rope_parameters``."""
    a = meta.arch
    return {
        "model_type": model_type,
        "architectures": [f"{'Qwen2' if model_type == 'qwen2' else 'Llama'}ForCausalLM"],
        **decoder_dims(meta),
        "rms_norm_eps": float(meta.require(f"{a}.attention.layer_norm_rms_epsilon")),
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        "max_position_embeddings": int(meta.get(f"{a}.context_length", context)),
        "tie_word_embeddings": "output.weight" not in meta.tensors,
        "hidden_act": "silu",
        **token_ids(meta),
    }


def _llama_config(meta: Meta) -> dict:
    a = meta.arch
    if meta.get(f"{a}.expert_count", 0):
        # Mixtral GGUFs say "llama" too; their experts need a different model.
        raise meta.fail("mixture-of-experts GGUF files are not supported")
    theta = float(meta.get(f"{a}.rope.freq_base", 10000.0))
    rope = _llama_rope(meta, theta, decoder_dims(meta)["head_dim"])
    config = _decoder_config(meta, "llama", rope, 2048)
    config.update(attention_bias=False, mlp_bias=False)
    return config


_LLAMA_TENSORS = {
    **DECODER_TENSORS,
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}


_QWEN2_TENSORS = {
    **_LLAMA_TENSORS,
    **{f"blk.{{i}}.attn_{p}.bias": f"model.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"},
}


def _qwen2_config(meta: Meta) -> dict:
    a = meta.arch
    if meta.get(f"{a}.rope.scaling.type", "none") != "none":
        raise meta.fail("rope scaling is not supported for qwen2 files")
    theta = float(meta.get(f"{a}.rope.freq_base", 1_000_000.0))
    rope = {"rope_type": "default", "rope_theta": theta}
    return {**_decoder_config(meta, "qwen2", rope, 32768), "use_sliding_window": False}


ARCHS = {
    "llama": Arch(_llama_config, _LLAMA_TENSORS, _llama_fix, frozenset({"rope_freqs.weight"})),
    "qwen2": Arch(_qwen2_config, _QWEN2_TENSORS, lambda name, w, config: w),
}


# --------------------------------------------------------------------------- export


def _rope(config: dict) -> dict:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return {"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0), **rope}


def _check_common(config: dict, rope_types: tuple[str, ...]) -> None:
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} (llama.cpp runs SiLU)")
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias (llama.cpp's graph has no MLP biases)")
    kind = _rope(config)["rope_type"]
    if kind not in rope_types:
        raise ValueError(f"rope_type {kind!r} (exportable: {', '.join(rope_types)})")


def _check_llama(config: dict) -> None:
    if config.get("attention_bias"):
        raise ValueError("attention_bias (not exported for the llama architecture)")
    # llama.cpp runs Mistral with full attention, as its own converter exports it: a
    # sliding window only matters past the window's length.
    _check_common(config, ("default", "linear", "llama3"))


def _check_qwen2(config: dict) -> None:
    if config.get("use_sliding_window") and "sliding_attention" in config.get("layer_types", []):
        raise ValueError("sliding-window layers (llama.cpp's qwen2 graph attends to all tokens)")
    _check_common(config, ("default",))


def _kv(arch: str, config: dict) -> list:
    rope = _rope(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rows = decoder_kv(arch, config) + [
        (f"{arch}.rope.dimension_count", head_dim, GGUFValueType.UINT32, None),
        (f"{arch}.rope.freq_base", rope["rope_theta"], GGUFValueType.FLOAT32, None),
    ]
    if rope["rope_type"] == "linear":
        rows += [
            (f"{arch}.rope.scaling.type", "linear", GGUFValueType.STRING, None),
            (f"{arch}.rope.scaling.factor", rope["factor"], GGUFValueType.FLOAT32, None),
        ]
    return rows


def _llama_export_fix(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    if name.endswith("self_attn.q_proj.weight"):
        return _permute_rows(w, config["num_attention_heads"])
    if name.endswith("self_attn.k_proj.weight"):
        return _permute_rows(w, config["num_key_value_heads"])
    return w


def _llama_extra(config: dict) -> list:
    rope = _rope(config)
    if rope["rope_type"] != "llama3":
        return []
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = rope["rope_theta"]
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return [("rope_freqs.weight", _llama3_factors(rope, inv_freq).astype(np.float32))]


_LLAMA_EXPORT = ExportArch(
    arch="llama",
    check=_check_llama,
    kv=lambda config: _kv("llama", config),
    tensors=_LLAMA_TENSORS,
    fix=_llama_export_fix,
    extra=_llama_extra,
)

EXPORTS = {
    "llama": _LLAMA_EXPORT,
    "mistral": _LLAMA_EXPORT,
    "qwen2": ExportArch(
        arch="qwen2",
        check=_check_qwen2,
        kv=lambda config: _kv("qwen2", config),
        tensors=_QWEN2_TENSORS,
        fix=lambda name, w, config: w,
    ),
}
