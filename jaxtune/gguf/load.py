"""Native GGUF import: config, tensors and tokenizer in Hugging Face form, without torch.

A GGUF file (llama.cpp's format) holds metadata key/values, a tokenizer and tensors that are
often block-quantized. This module reads it with :class:`~jaxtune.gguf.reader.GGUFFile`
(a memory map: opening a multi-GB file costs only the header, and the vocabulary is decoded
only for the tokenizer) and translates everything into the names, layouts and config fields
of a Hugging Face checkpoint, so the rest of jaxtune reuses its HF key tables unchanged::

    config = read_gguf_config(path)              # config.json-style dict
    for name, array in iter_gguf_tensors(path):  # HF names, float32, one tensor at a time
        ...
    tokenizer = load_gguf_tokenizer(path)        # HF fast tokenizer with chat template

Adding an architecture means one :class:`~jaxtune.gguf.arch.Arch` entry (a config function,
a tensor-name table and a per-tensor fix-up function) in a ``gguf_<family>.py`` module:
:mod:`~jaxtune.gguf.llama` (``llama``), :mod:`~jaxtune.gguf.gemma` (``gemma3``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.errors import ModelLoadError
from jaxtune.gguf import gemma as gguf_gemma
from jaxtune.gguf import llama as gguf_llama
from jaxtune.gguf.arch import Arch, Meta, dequantize
from jaxtune.gguf.reader import GGUFFile, GGUFFormatError

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


_ARCHS: dict[str, Arch] = {**gguf_llama.ARCHS, **gguf_gemma.ARCHS}


def _arch(meta: Meta) -> Arch:
    spec = _ARCHS.get(meta.arch)
    if spec is None:
        raise ModelLoadError(
            f"{meta.path}: GGUF architecture {meta.arch!r} is not supported "
            f"(supported: {', '.join(sorted(_ARCHS))})"
        )
    return spec


def _hf_name(meta: Meta, spec: Arch, gguf_name: str, n_layers: int) -> str | None:
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
    meta = Meta(p, reader)
    return _arch(meta).config(meta)


def iter_gguf_tensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Streams a GGUF file's weights as HF-named float32 arrays, one tensor at a time.

    Quantized tensors are dequantized with ``gguf.quants.dequantize`` as they are reached,
    so peak memory is one float32 tensor. Linear weights come out as [out_features,
    in_features] (HF/torch layout), with the architecture's fix-ups applied (llama: q/k
    rows un-permuted back to HF's rotate-half order; gemma3: norm weights ``1 + w`` -> ``w``);
    ``lm_head.weight`` appears only when the embeddings are untied.

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
    meta = Meta(p, reader)
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


def _stream(meta: Meta, spec: Arch, config: dict, plan: list) -> Iterator[tuple[str, np.ndarray]]:
    p = meta.path
    for t, hf in plan:
        w = dequantize(p, t)  # owned memory: no view of the map survives
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
    torch. A file without a chat template gets its architecture's default, if it has one
    (Gemma 3); transformers leaves it without.

    Args:
        path: a ``.gguf`` file.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.

    Raises:
        ModelLoadError: the file is unreadable or has no tokenizer transformers can build.
    """
    p, reader = _open(path)
    meta = Meta(p, reader)
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
    spec = _ARCHS.get(meta.arch)
    if not tok_config.get("chat_template") and spec is not None and spec.chat_template:
        # A base model's file may carry none; its family's template still fits its vocab.
        tok_config["chat_template"] = spec.chat_template
    try:
        backend, extra = convert(meta.arch, tok_dict)
    except Exception as exc:  # ValueError for unknown tokenizer types, KeyError for gaps
        raise meta.fail(f"cannot build its tokenizer ({type(exc).__name__}: {exc})") from None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config, **extra)
