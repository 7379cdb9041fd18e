"""Shared pieces of the GGUF importer: typed metadata access, dequantization, arch specs.

Each architecture module (:mod:`jaxtune.gguf.llama`, :mod:`jaxtune.gguf.gemma`)
describes itself with an :class:`Arch`; :mod:`jaxtune.gguf.load` runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.errors import ModelLoadError
from jaxtune.gguf.reader import GGUFFile, GGUFFormatError, GGUFValueType, TensorInfo


class Meta:
    """Typed access to a file's metadata, with errors that name the file."""

    def __init__(self, path: Path, reader: GGUFFile):
        self.path = path
        self.reader = reader
        self.tensors = {t.name: t for t in reader.tensors}
        self.arch = str(self.get("general.architecture", "")) or "<missing>"

    def get(self, key: str, default: Any = None) -> Any:
        try:
            value = self.reader.get(key, default)
        except GGUFFormatError as exc:  # a large array is decoded (and checked) only here
            raise self.fail(f"corrupt metadata value {key!r} ({exc})") from None
        # GGUF stores floats as float32: 1e-5 reads back as 9.999999747e-06. The shortest
        # decimal that round-trips through float32 is the value the HF config had.
        if self.reader.value_type(key) == GGUFValueType.FLOAT32:
            value = float(str(np.float32(value)))
        return value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(
                f"{self.path}: GGUF metadata has no {key!r} (needed to build the "
                f"{self.arch!r} config)"
            )
        return value

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {what} (architecture {self.arch!r})")


def dequantize(path: Path, t: TensorInfo) -> np.ndarray:
    """One tensor as owned float32 memory in numpy (row-major, slowest axis first) order.

    Args:
        path: the file, for error messages.
        t: the tensor; ``t.shape`` is ggml's fastest-first order, e.g. (in, out).

    Returns:
        float32 [*reversed(t.shape)], e.g. [out_features, in_features] for a linear weight.

    Raises:
        ModelLoadError: gguf cannot decode the tensor's type or its byte size is wrong.
    """
    import gguf

    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as exc:  # NotImplementedError for exotic types, ValueError for bad sizes
        raise ModelLoadError(
            f"{path}: cannot dequantize tensor {t.name!r} of type {t.tensor_type.name} "
            f"({type(exc).__name__}: {exc})"
        ) from None
    # GGUF lists dims fastest-first (ggml's ne[0] is the row length); numpy wants the reverse.
    shape = tuple(int(d) for d in reversed(t.shape))
    w = np.asarray(w, dtype=np.float32).reshape(shape)
    # F32 tensors come back as views of the read-only memory map; hand out owned memory.
    return w if w.flags.writeable else w.copy()


# GGUF tensor name -> HF name shared by the decoder families llama.cpp names alike;
# each architecture adds its norms and MLP ({i}: the block index).
DECODER_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


# One metadata row for GGUFWriter.add_key_value: (key, value, type, array item type).
KV = tuple[str, Any, GGUFValueType, "GGUFValueType | None"]


def decoder_kv(arch: str, config: dict) -> list[KV]:
    """The ``<arch>.*`` shape and norm rows every decoder writes (llama.cpp's key names)."""
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return [
        (f"{arch}.vocab_size", config["vocab_size"], u32, None),
        (f"{arch}.context_length", config["max_position_embeddings"], u32, None),
        (f"{arch}.embedding_length", config["hidden_size"], u32, None),
        (f"{arch}.block_count", config["num_hidden_layers"], u32, None),
        (f"{arch}.feed_forward_length", config["intermediate_size"], u32, None),
        (f"{arch}.attention.head_count", config["num_attention_heads"], u32, None),
        (f"{arch}.attention.head_count_kv", config["num_key_value_heads"], u32, None),
        (f"{arch}.attention.key_length", head_dim, u32, None),
        (f"{arch}.attention.value_length", head_dim, u32, None),
        (f"{arch}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"], f32, None),
    ]


@dataclass(frozen=True)
class ExportArch:
    """How a Hugging Face model type is written as one ``general.architecture``."""

    arch: str  # llama.cpp's architecture name
    check: Callable[[dict], None]  # raises ValueError naming what llama.cpp cannot run
    kv: Callable[[dict], list]  # HF config -> ``<arch>.*`` metadata rows (KV)
    tensors: dict[str, str]  # GGUF name ("blk.{i}." for layers) -> HF name
    fix: Callable[[str, np.ndarray, dict], np.ndarray]  # (HF name, HF array, config) -> GGUF's
    # Tensors llama.cpp wants that HF folds into the config (llama3's rope_freqs).
    extra: Callable[[dict], list] = lambda config: []


@dataclass(frozen=True)
class Arch:
    """How one ``general.architecture`` maps onto a Hugging Face model."""

    config: Callable[[Meta], dict]  # metadata -> HF config dict
    tensors: dict[str, str]  # GGUF name ("blk.{i}." for layers) -> HF name
    fix: Callable[[str, np.ndarray, dict], np.ndarray]  # (HF name, array, config) -> array
    consumed: frozenset[str] = frozenset()  # GGUF tensors folded into the config instead
    # The tokenizer's chat template when the file has none (e.g. a base model's GGUF).
    chat_template: str | None = None


def token_ids(meta: Meta) -> dict:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` config entries the file sets."""
    out = {}
    for hf_key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{gguf_key}_token_id")
        if token_id is not None:
            out[f"{hf_key}_token_id"] = int(token_id)
    return out


def decoder_dims(meta: Meta) -> dict:
    """The shape entries every decoder config needs, checked against what jaxtune runs.

    Returns HF config entries ``vocab_size`` (the embedding's rows; the token list may be
    shorter), ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim``.
    """
    a = meta.arch
    hidden = int(meta.require(f"{a}.embedding_length"))
    n_head = int(meta.require(f"{a}.attention.head_count"))
    n_kv = meta.get(f"{a}.attention.head_count_kv", n_head)
    if not isinstance(n_kv, int):
        raise meta.fail(f"per-layer head_count_kv {n_kv!r} is not supported")
    head_dim = int(meta.get(f"{a}.attention.key_length", hidden // n_head))
    if meta.get(f"{a}.attention.value_length", head_dim) != head_dim:
        raise meta.fail("attention value_length != key_length is not supported")
    # The graphs jaxtune mirrors rotate the whole head; a partial rotary dim is other math.
    if meta.get(f"{a}.rope.dimension_count", head_dim) != head_dim:
        raise meta.fail(f"rope.dimension_count != head_dim ({head_dim}) is not supported")
    embed = meta.tensors.get("token_embd.weight")
    if embed is None:
        raise meta.fail("no token_embd.weight tensor")
    return {
        "vocab_size": int(embed.shape[-1]),
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(f"{a}.feed_forward_length")),
        "num_hidden_layers": int(meta.require(f"{a}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
    }
