"""GGUF -> Hugging Face for llama.cpp's ``llama`` architecture (Llama 2/3, Mistral, SmolLM2).

llama.cpp stores q/k projection rows permuted for its interleaved RoPE (undone here) and
Llama 3.1+ rope scaling as a ``rope_freqs.weight`` tensor (turned back into HF's
``rope_type: llama3`` parameters).
"""

from __future__ import annotations

import math

import numpy as np

from jaxtune.gguf.arch import DECODER_TENSORS, Arch, Meta, decoder_dims, dequantize, token_ids


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


def _llama_config(meta: Meta) -> dict:
    a = meta.arch
    if meta.get(f"{a}.expert_count", 0):
        # Mixtral GGUFs say "llama" too; their experts need a different model.
        raise meta.fail("mixture-of-experts GGUF files are not supported")
    dims = decoder_dims(meta)
    theta = float(meta.get(f"{a}.rope.freq_base", 10000.0))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **dims,
        "rms_norm_eps": float(meta.require(f"{a}.attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_parameters": _llama_rope(meta, theta, dims["head_dim"]),
        "max_position_embeddings": int(meta.get(f"{a}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in meta.tensors,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    config.update(token_ids(meta))
    return config


_LLAMA_TENSORS = {
    **DECODER_TENSORS,
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}


ARCHS = {
    "llama": Arch(_llama_config, _LLAMA_TENSORS, _llama_fix, frozenset({"rope_freqs.weight"})),
}
