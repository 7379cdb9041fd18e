"""A tokenizer as GGUF ``tokenizer.*`` metadata, in the form llama.cpp tokenizes with.

Two sources, most faithful first:

* the base model's own GGUF file (:func:`kv_from_gguf`): fine-tuning changes no token, so
  its vocabulary, scores, merges, token types and pre-tokenizer name are copied as they are;
* a Hugging Face tokenizer (:func:`kv_from_hf`): byte-level BPE (GPT-2 style: SmolLM2,
  Llama 3, Qwen2) as ``gpt2`` tokens + merges with llama.cpp's name for its pre-tokenizer;
  sentencepiece (Llama 2, TinyLlama, Mistral, Gemma) as ``llama`` tokens + scores + types,
  read from ``tokenizer.model`` with sentencepiece as llama.cpp's converter does.

Either way :func:`special_kv` then writes what the trained model uses: the special token
ids (bos/eos/unk/pad and eot, the chat turn terminator), add_bos/add_eos, and the chat
template the run trained with.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from gguf import GGUFValueType as V
from gguf import TokenType
from sentencepiece import SentencePieceProcessor

from jaxtune.gguf.arch import KV
from jaxtune.gguf.reader import GGUFFile

# Rows that kv_from_gguf never copies: special_kv writes them from the trained tokenizer.
_REWRITTEN = (
    "tokenizer.chat_template",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
)

# Pre-tokenizers llama.cpp implements natively, by their tokenizer.json form (llama.cpp's
# converter tells them apart by hashing an encoding; the structure is what decides it).
_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace("\\p{N}{1,3}", "\\p{N}")
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _pads(tokens: list, n_vocab: int, what: str) -> int:
    """How many ``[PAD{i}]`` tokens make the list as long as the embedding."""
    if len(tokens) > n_vocab:
        raise ValueError(f"{what} has {len(tokens)} tokens but the embedding only {n_vocab} rows")
    return n_vocab - len(tokens)


def kv_from_gguf(path: str | Path, n_vocab: int) -> list[KV]:
    """Every ``tokenizer.*`` row of a GGUF file except those :func:`special_kv` writes.

    Args:
        path: the base model's ``.gguf`` file.
        n_vocab: rows of the exported embedding; a shorter token list is padded with unused
            ``[PAD{i}]`` tokens, as llama.cpp requires one token per row.
    """
    f = GGUFFile(path)
    rows: list[KV] = []
    n_tokens = len(f.get("tokenizer.ggml.tokens") or [])
    pad = _pads([0] * n_tokens, n_vocab, str(path))
    fill = {
        "tokenizer.ggml.tokens": [f"[PAD{n_tokens + i}]" for i in range(pad)],
        "tokenizer.ggml.scores": [-1000.0] * pad,
        "tokenizer.ggml.token_type": [int(TokenType.UNUSED)] * pad,
    }
    for key in f.fields:
        if not key.startswith("tokenizer.") or key in _REWRITTEN:
            continue
        value, vtype, sub = f.get(key), f.value_type(key), f.item_type(key)
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if key in fill and pad:
            value = list(value) + fill[key]
        rows.append((key, value, vtype, sub))
    return rows


def _bpe_pre(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # digits one by one, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == _QWEN2_SPLIT:
            return "qwen2"
    raise ValueError(
        f"its byte-level pre-tokenizer {json.dumps(pre)[:200]} is none that llama.cpp "
        "implements here (GPT-2, SmolLM, Llama 3, Qwen2)"
    )


def _added(tokenizer) -> dict[int, tuple[str, bool]]:
    return {
        i: (t.content, bool(t.special))
        for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
    }


def _bpe_kv(tokenizer, model: dict, pre: dict | None, n_vocab: int) -> list[KV]:
    vocab: dict[str, int] = model["vocab"]
    tokens: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    types = [int(TokenType.NORMAL)] * len(tokens)
    for text, i in vocab.items():
        tokens[i] = text
    for i, (text, special) in _added(tokenizer).items():
        if i >= len(tokens):
            tokens += [None] * (i + 1 - len(tokens))
            types += [int(TokenType.NORMAL)] * (i + 1 - len(types))
        tokens[i] = text
        types[i] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", int(TokenType.UNUSED)
    pad = _pads(tokens, n_vocab, "the tokenizer")
    tokens += [f"[PAD{len(tokens) + i}]" for i in range(pad)]
    types += [int(TokenType.UNUSED)] * pad
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return [
        ("tokenizer.ggml.model", "gpt2", V.STRING, None),
        ("tokenizer.ggml.pre", _bpe_pre(pre), V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
    ]


def _add_space_prefix(backend: dict) -> bool:
    """Does the sentencepiece tokenizer put ``▁`` before the text (Llama 2: yes, Gemma: no)?"""
    text = json.dumps({k: backend.get(k) for k in ("normalizer", "pre_tokenizer")})
    return (
        '"Prepend"' in text
        or re.search(r'"prepend_scheme": "(always|first)"', text) is not None
        or ('"Metaspace"' in text and '"add_prefix_space": true' in text)
    )


def _spm_kv(tokenizer, spm_file: Path, backend: dict, n_vocab: int) -> list[KV]:
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(spm_file))
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [int(TokenType.UNUSED)] * n_vocab
    if sp.vocab_size() > n_vocab:
        raise ValueError(f"{spm_file} has {sp.vocab_size()} pieces but the embedding {n_vocab}")
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.IdToPiece(i), float(sp.GetScore(i))
        kind = TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = TokenType.UNUSED
        elif sp.IsByte(i):
            kind = TokenType.BYTE
        types[i] = int(kind)
    for i, (text, special) in _added(tokenizer).items():
        if i >= n_vocab:
            raise ValueError(f"added token {text!r} has id {i}, beyond the embedding's {n_vocab}")
        if i < sp.vocab_size() and tokens[i] == text and types[i] != TokenType.NORMAL:
            continue  # sentencepiece's own control/unknown token
        tokens[i], scores[i] = text, -1000.0
        types[i] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
    return [
        ("tokenizer.ggml.model", "llama", V.STRING, None),
        ("tokenizer.ggml.pre", "default", V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.scores", scores, V.ARRAY, V.FLOAT32),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.add_space_prefix", _add_space_prefix(backend), V.BOOL, None),
    ]


def kv_from_hf(tokenizer, source_dir: str | Path | None, n_vocab: int) -> list[KV]:
    """``tokenizer.ggml.*`` vocabulary rows for a Hugging Face fast tokenizer.

    Args:
        tokenizer: a ``PreTrainedTokenizerFast``.
        source_dir: the HF model directory it came from; a sentencepiece tokenizer needs its
            ``tokenizer.model`` (the scores llama.cpp merges by are only there).
        n_vocab: rows of the exported embedding (the token list is padded to it).

    Raises:
        ValueError: a tokenizer llama.cpp cannot run (the message says what it is).
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        return _bpe_kv(tokenizer, model, backend.get("pre_tokenizer"), n_vocab)
    spm = Path(source_dir) / "tokenizer.model" if source_dir else None
    if model.get("type") in ("BPE", "Unigram") and spm is not None and spm.is_file():
        return _spm_kv(tokenizer, spm, backend, n_vocab)
    if model.get("type") in ("BPE", "Unigram"):
        raise ValueError(
            "a sentencepiece tokenizer is written from its tokenizer.model, which is not in "
            f"{source_dir}; copy it there from the base model"
        )
    raise ValueError(f"tokenizer model {model.get('type')!r} has no llama.cpp form here")


def _encodes_with(tokenizer, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0 if first else -1] == token_id


def special_kv(tokenizer, n_vocab: int, eot_id: int | None) -> list[KV]:
    """Special token ids, add_bos/add_eos and the chat template of the trained tokenizer.

    ``add_bos``/``add_eos`` are what the tokenizer does (a BOS in front of plain text), so
    llama.cpp tokenizes prompts as training did. ``eot_id`` is the chat template's turn
    terminator (``<|im_end|>``, ``<end_of_turn>``): llama.cpp stops generating there.
    """
    rows: list[KV] = []
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None and 0 <= tid < n_vocab:
            rows.append((f"tokenizer.ggml.{key}_token_id", int(tid), V.UINT32, None))
    if eot_id is not None:
        rows.append(("tokenizer.ggml.eot_token_id", int(eot_id), V.UINT32, None))
    bos = _encodes_with(tokenizer, tokenizer.bos_token_id, first=True)
    eos = _encodes_with(tokenizer, tokenizer.eos_token_id, first=False)
    rows += [
        ("tokenizer.ggml.add_bos_token", bos, V.BOOL, None),
        ("tokenizer.ggml.add_eos_token", eos, V.BOOL, None),
    ]
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: llama.cpp reads the default
        template = template.get("default", next(iter(template.values()), None))
    if template:
        rows.append(("tokenizer.chat_template", template, V.STRING, None))
    return rows
