"""Native GGUF import: config, tensors and tokenizer in Hugging Face form, without torch.

A GGUF file (llama.cpp's format) holds metadata key/values, a tokenizer and tensors that are
often block-quantized. This module reads it with :class:`~jaxtune.hf.gguf_reader.GGUFFile`
(a memory map: opening a multi-GB file costs only the header, and the vocabulary is decoded
only for the tokenizer) and translates everything into the names, layouts and config fields
of a Hugging Face checkpoint, so the rest of jaxtune reuses its HF key tables unchanged::

    config = read_gguf_config(path)              # config.json-style dict
    for name, array in iter_gguf_tensors(path):  # HF names, float32, one tensor at a time
        ...
    tokenizer = load_gguf_tokenizer(path)        # HF fast tokenizer with chat template

Adding an architecture (qwen2, gemma3, ...) means one :class:`_Arch` entry in ``_ARCHS``: a
config function, a tensor-name table and a per-tensor fix-up function.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.errors import ModelLoadError
from jaxtune.hf.gguf_reader import GGUFFile, GGUFFormatError, GGUFValueType, TensorInfo

_MAGIC = b"GGUF"
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------- reading


def _open(path: str | Path) -> tuple[Path, GGUFFile]:
    """Validates ``path`` and returns it with its (cached) parsed header."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file (expected a .gguf model file)")
    if not p.is_file():
        raise ModelLoadError(f"{p}: is not a file (expected a .gguf model file)")
    st = p.stat()
    # Keyed on size and mtime so a file rewritten in place is read again.
    return p, _reader(str(p.resolve()), st.st_size, st.st_mtime_ns)


# The config, tensor and tokenizer readers each need the header; a small cache lets a
# loader call all three for the price of one parse (~0.1 s). A cached reader holds only the
# header's scalars and a memory map (large arrays such as the vocabulary are decoded on use).
@functools.lru_cache(maxsize=2)
def _reader(path: str, size: int, mtime_ns: int) -> GGUFFile:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _MAGIC:
        raise ModelLoadError(
            f"{path}: not a GGUF file (expected magic {_MAGIC!r} in the first 4 bytes, "
            f"found {head!r})"
        )
    try:
        reader = GGUFFile(path)
    except (GGUFFormatError, OSError) as exc:
        raise ModelLoadError(
            f"{path}: truncated or corrupt GGUF file ({size} bytes); expected a complete "
            f"file as llama.cpp writes it ({exc})"
        ) from None
    # A file cut inside the tensor data still parses; catch it here rather than as a
    # short read in the middle of a streamed load.
    t = reader.truncated_tensor()
    if t is not None:
        raise ModelLoadError(
            f"{path}: truncated GGUF file: tensor {t.name!r} ends at byte "
            f"{t.offset + t.n_bytes} but the file has {size} bytes"
        )
    return reader


class _Meta:
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


def _dequantize(path: Path, t: TensorInfo) -> np.ndarray:
    """One tensor as float32 in numpy (row-major, slowest axis first) order."""
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


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class _Arch:
    """How one ``general.architecture`` maps onto a Hugging Face model."""

    config: Callable[[_Meta], dict]  # metadata -> HF config dict
    tensors: dict[str, str]  # GGUF name ("blk.{i}." for layers) -> HF name
    fix: Callable[[str, np.ndarray, dict], np.ndarray]  # (HF name, array, config) -> array
    consumed: frozenset[str] = frozenset()  # GGUF tensors folded into the config instead


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


def _llama3_rope(meta: _Meta, theta: float, head_dim: int) -> dict | None:
    """Recovers HF ``rope_type: llama3`` parameters from a ``rope_freqs.weight`` tensor.

    llama.cpp writes Llama 3.1+ rope scaling as that tensor, not as metadata. Its mid band
    is linear in 1 / wavelength; with ``low_freq_factor = 1`` (Meta's value) the slope and
    intercept give the rest. The result is checked by recomputing the tensor.
    """
    f = _dequantize(meta.path, meta.tensors["rope_freqs.weight"]).astype(np.float64).ravel()
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


def _llama_rope(meta: _Meta, theta: float, head_dim: int) -> dict:
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


def _llama_config(meta: _Meta) -> dict:
    a = meta.arch
    if meta.get(f"{a}.expert_count", 0):
        # Mixtral GGUFs say "llama" too; their experts need a different model.
        raise meta.fail("mixture-of-experts GGUF files are not supported")
    hidden = int(meta.require(f"{a}.embedding_length"))
    n_head = int(meta.require(f"{a}.attention.head_count"))
    n_kv = meta.get(f"{a}.attention.head_count_kv", n_head)
    if not isinstance(n_kv, int):
        raise meta.fail(f"per-layer head_count_kv {n_kv!r} is not supported")
    head_dim = int(meta.get(f"{a}.attention.key_length", hidden // n_head))
    if meta.get(f"{a}.attention.value_length", head_dim) != head_dim:
        raise meta.fail("attention value_length != key_length is not supported")
    # llama.cpp's llama graph rotates the whole head; a partial rotary dim means other math.
    if meta.get(f"{a}.rope.dimension_count", head_dim) != head_dim:
        raise meta.fail(f"rope.dimension_count != head_dim ({head_dim}) is not supported")
    embed = meta.tensors.get("token_embd.weight")
    if embed is None:
        raise meta.fail("no token_embd.weight tensor")
    theta = float(meta.get(f"{a}.rope.freq_base", 10000.0))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        # The embedding rows are what the weights need; the token list can be shorter.
        "vocab_size": int(embed.shape[-1]),
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(f"{a}.feed_forward_length")),
        "num_hidden_layers": int(meta.require(f"{a}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta.require(f"{a}.attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_parameters": _llama_rope(meta, theta, head_dim),
        "max_position_embeddings": int(meta.get(f"{a}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in meta.tensors,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    for hf_key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{gguf_key}_token_id")
        if token_id is not None:
            config[f"{hf_key}_token_id"] = int(token_id)
    return config


_LLAMA_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

_ARCHS: dict[str, _Arch] = {
    "llama": _Arch(_llama_config, _LLAMA_TENSORS, _llama_fix, frozenset({"rope_freqs.weight"})),
}


def _arch(meta: _Meta) -> _Arch:
    spec = _ARCHS.get(meta.arch)
    if spec is None:
        raise ModelLoadError(
            f"{meta.path}: GGUF architecture {meta.arch!r} is not supported "
            f"(supported: {', '.join(sorted(_ARCHS))})"
        )
    return spec


def _hf_name(meta: _Meta, spec: _Arch, gguf_name: str, n_layers: int) -> str | None:
    """HF name of one GGUF tensor; None for tensors folded into the config."""
    if gguf_name in spec.consumed:
        return None
    m = _BLOCK.match(gguf_name)
    key, layer = (f"blk.{{i}}.{m.group(2)}", int(m.group(1))) if m else (gguf_name, None)
    hf = spec.tensors.get(key)
    if hf is None or (layer is not None and layer >= n_layers):
        # Silently dropping a tensor would change the model's math; refuse instead.
        raise meta.fail(f"unexpected tensor {gguf_name!r}; jaxtune does not know how to import it")
    return hf.format(i=layer)


# --------------------------------------------------------------------------- public API


def release_readers() -> None:
    """Drops cached readers and so their memory maps of the files' tensor data."""
    _reader.cache_clear()


def read_gguf_config(path: str | Path) -> dict:
    """Builds a Hugging Face ``config.json``-style dict from a GGUF file's metadata.

    Args:
        path: a ``.gguf`` file.

    Returns:
        The config dict, e.g. for SmolLM2-135M: ``model_type="llama"``, ``vocab_size=49152``,
        ``hidden_size=576``, ``num_hidden_layers=30``, ``num_attention_heads=9``,
        ``num_key_value_heads=3``, ``head_dim=64``, ``rope_parameters={"rope_type":
        "default", "rope_theta": 100000.0}``, ``tie_word_embeddings=True``, token ids.

    Raises:
        ModelLoadError: the file is missing, not GGUF, truncated, or of an unsupported
            architecture or variant.
    """
    p, reader = _open(path)
    meta = _Meta(p, reader)
    return _arch(meta).config(meta)


def iter_gguf_tensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Streams a GGUF file's weights as HF-named float32 arrays, one tensor at a time.

    Quantized tensors are dequantized with ``gguf.quants.dequantize`` as they are reached,
    so peak memory is one float32 tensor. Linear weights come out as [out_features,
    in_features] (HF/torch layout); q/k projections are un-permuted back to HF's
    rotate-half order; ``lm_head.weight`` appears only when the embeddings are untied.

    Args:
        path: a ``.gguf`` file.

    Yields:
        ``(hf_name, array)``, e.g. ``("model.embed_tokens.weight", [vocab, hidden])``,
        ``("model.layers.0.self_attn.k_proj.weight", [n_kv_heads * head_dim, hidden])``,
        ``("model.layers.0.mlp.down_proj.weight", [hidden, intermediate])``,
        ``("model.norm.weight", [hidden])``.

    Raises:
        ModelLoadError: as :func:`read_gguf_config` (raised by the call itself, before
            iteration), also for tensors the architecture does not define or lacks; while
            iterating, for quantization types gguf cannot decode or q/k shapes that do not
            fit the head counts.
    """
    p, reader = _open(path)
    meta = _Meta(p, reader)
    spec = _arch(meta)
    config = spec.config(meta)
    n_layers = config["num_hidden_layers"]
    plan = [(t, _hf_name(meta, spec, t.name, n_layers)) for t in reader.tensors]
    plan = [(t, hf) for t, hf in plan if hf is not None]
    expected = {hf.format(i=i) for hf in spec.tensors.values() for i in range(n_layers)}
    if config.get("tie_word_embeddings"):
        expected.discard("lm_head.weight")
    missing = sorted(expected - {hf for _, hf in plan})
    if missing:
        raise meta.fail(f"{len(missing)} tensors are missing, e.g. {missing[:3]}")
    # Everything above runs at call time, so a bad file fails before the first tensor is asked for.
    return _stream(meta, spec, config, plan)


def _stream(meta: _Meta, spec: _Arch, config: dict, plan: list) -> Iterator[tuple[str, np.ndarray]]:
    p = meta.path
    for t, hf in plan:
        w = _dequantize(p, t)  # owned memory: no view of the map survives
        meta.reader.evict(t)
        try:
            w = spec.fix(hf, w, config)
        except ValueError as exc:  # a reshape that does not fit the config's head counts
            raise meta.fail(f"tensor {t.name!r} of shape {w.shape} does not fit: {exc}") from None
        yield hf, w


def _tokenizer_api() -> tuple[Callable, dict]:
    # AutoTokenizer(gguf_file=...) imports torch whenever it is installed (its GGUF reader,
    # integrations/gguf/reader.py, and configuration_utils both do). The converter module
    # below does not, so the metadata is read here with gguf and handed to it.
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:  # older transformers kept both in integrations/ggml.py
        from transformers.integrations.ggml import (  # type: ignore[no-redef]
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    return convert_gguf_tokenizer, GGUF_TOKENIZER_MAPPING


def load_gguf_tokenizer(path: str | Path) -> Any:
    """Builds the HF fast tokenizer (with chat template) stored in a GGUF file's metadata.

    Mirrors ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` (same vocabulary, merges,
    pre-tokenizer, special tokens, ``add_bos_token`` and chat template) without importing
    torch.

    Args:
        path: a ``.gguf`` file.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.

    Raises:
        ModelLoadError: the file is unreadable or has no tokenizer transformers can build.
    """
    p, reader = _open(path)
    meta = _Meta(p, reader)
    convert, mapping = _tokenizer_api()
    tok_dict: dict[str, Any] = {}
    tok_config: dict[str, Any] = {}
    for group, renames in mapping.items():
        target = tok_dict if group == "tokenizer" else tok_config
        for key, name in renames.items():
            value = meta.get(f"tokenizer.{key}")
            if value is not None:
                target[name] = value
    tokens = tok_dict.get("tokens")
    if not tokens:
        raise meta.fail("no tokenizer in the GGUF metadata (tokenizer.ggml.tokens)")
    # The same defaults transformers' get_gguf_tokenizer applies.
    if tok_dict.get("tokenizer_type") == "llama":
        tok_config.setdefault("add_bos_token", True)  # llama.cpp adds BOS to sentencepiece
    elif tok_dict.get("tokenizer_type") == "gemma4":
        tok_config["add_bos_token"] = False  # its chat template writes <bos> itself
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise meta.fail(f"{name} token id {token_id} is outside the {len(tokens)}-token vocab")
        tok_config[f"{name}_token"] = tokens[token_id] if token_id is not None else None
    try:
        backend, extra = convert(meta.arch, tok_dict)
    except Exception as exc:  # ValueError for unknown tokenizer types, KeyError for gaps
        raise meta.fail(f"cannot build its tokenizer ({type(exc).__name__}: {exc})") from None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config, **extra)
