"""``jaxtune export --gguf``: one llama.cpp file + an Ollama Modelfile, checked before it is kept.

The model is merged (LoRA/DoRA folded in, quantized bases dequantized first), written with
``gguf``'s writer (:mod:`jaxtune.gguf.writer`), then read back with jaxtune's own GGUF
importer and compared with the trained model on probe prompts:

* f32 / f16 / bf16: max |logit diff| within the type's tolerance;
* q8_0 / q5_* / q4_*: top-1 agreement at or above the type's floor (and the max |logit
  diff|, reported);
* the tokenizer llama.cpp would build from the file's metadata encodes every probe text
  to the trained tokenizer's ids.

Anything short of that raises :class:`~jaxtune.errors.ExportError` and leaves nothing at
the output path.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flax import nnx
from gguf import GGUFValueType

from jaxtune.atomic import atomic_dir, check_out_dir
from jaxtune.data.chat import turn_terminator
from jaxtune.errors import ConfigError, ExportError, ModelLoadError
from jaxtune.eval.runner import Progress
from jaxtune.export.modelfile import modelfile_text
from jaxtune.gguf import vocab
from jaxtune.gguf.load import load_gguf_tokenizer, release_readers
from jaxtune.gguf.writer import GGUF_TYPES, GGUFType, export_arch, string_kv, write_gguf
from jaxtune.hf.families import hf_module
from jaxtune.hf.io import iter_hf_tensors
from jaxtune.loading import from_pretrained, model_kind, run_model_source
from jaxtune.models import family_of_config
from jaxtune.peft import merged_copy
from jaxtune.quant import dequantize_model
from jaxtune.resources import resolve_path
from jaxtune.verify import default_tolerance, numpy_logits, param_dtype

# Probe prompts: prose, code, digits, non-ASCII and whitespace runs (where tokenizers
# differ first), plus a chat prompt rendered with the model's own template.
PROBE_TEXTS = (
    "The capital of France is Paris. It is known for the Eiffel Tower,",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "In 1969, 3 astronauts flew 384,400 km; 12.5% of 80 is 10.",
    "Grüße aus München! ¿Qué tal? 東京は日本の首都です。",
    "  leading spaces,\ttabs\n\nand  double  spaces.",
)
PROBE_QUESTION = "What is the capital of France?"

# (atol, rtol on max |logit|) for 16-bit files, beyond the model's own dtype tolerance.
# Rounding every weight once moves logits by a few 1e-3 (f16) / 1e-2 (bf16) on SmolLM2.
FLOAT_TOLERANCE = {"f16": (2e-2, 5e-3), "bf16": (1e-1, 2.5e-2)}
# Least top-1 agreement (over the probe positions) a quantized file must keep. They catch
# a broken file (a wrong permutation or norm leaves a few percent), not a lossy type: on a
# SmolLM2-135M LoRA fine-tune, round-to-nearest quantization (gguf-py's, the same as
# llama-quantize's for these legacy types) kept q8_0 96.9%, q5_0 76.7%, q4_0 62.0%,
# q4_1 61.3%, q5_1 44.2% (benchmarks/RESULTS.md, "GGUF export"); larger models lose less.
MIN_TOP1 = {"q8_0": 0.85, "q5_1": 0.3, "q5_0": 0.3, "q4_1": 0.3, "q4_0": 0.3}


@dataclass(frozen=True)
class GGUFReport:
    """What :func:`export_gguf` wrote and how close it is to the trained model."""

    path: Path  # the .gguf file
    modelfile: Path
    kind: str  # "q8_0", ...
    bytes: int
    positions: int  # probe positions compared
    top1: float  # fraction of positions where the argmax agrees
    max_logit_diff: float
    kld: float  # mean KL divergence (trained model || file) per position, nats
    limit: str  # the check it passed, e.g. "max |logit diff| <= 1.2e-03"

    def summary(self) -> str:
        return (
            f"wrote {self.path} ({GGUF_TYPES[self.kind].label}, {self.bytes / 2**20:.1f} MiB) "
            f"and {self.modelfile.name}; verified on {self.positions} probe positions: "
            f"top-1 agreement {100 * self.top1:.1f}%, mean KL {self.kld:.2e}, max |logit "
            f"diff| {self.max_logit_diff:.2e} ({self.limit}); tokenizer ids match"
        )


def gguf_kind(name: str) -> GGUFType:
    """The :data:`GGUF_TYPES` entry for a ``--gguf-type`` value (ConfigError otherwise)."""
    kind = GGUF_TYPES.get(str(name).lower())
    if kind is None:
        raise ConfigError(f"--gguf-type {name!r}: expected one of {', '.join(GGUF_TYPES)}")
    return kind


def _source_gguf(source: str | None) -> Path | None:
    """The base model's .gguf file when the model came from one (directly or via a run)."""
    if not source:
        return None
    path = resolve_path(source)
    kind = model_kind(path)
    if kind == "run":
        return _source_gguf(run_model_source(path))
    return path if kind == "gguf" else None


def _source_dir(source: str | None) -> Path | None:
    if not source:
        return None
    path = resolve_path(source)
    if model_kind(path) == "run":
        return _source_dir(run_model_source(path))
    return path if path.is_dir() else None


def _slug(text: str) -> str:
    """A file-name stem: safe characters only, without a quantization suffix of the source
    (``SmolLM2-135M-Instruct.Q4_1`` -> ``SmolLM2-135M-Instruct``)."""
    text = re.sub(r"[.-](f32|f16|bf16|q\d(_\w+)?|iq\d\w*)$", "", text, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def probe_prompts(tokenizer, vocab_size: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The export check's probe texts and their ids and mask int32 [n_texts, T]."""
    texts = _probe_texts(tokenizer)
    return (texts, *_probe_batch(tokenizer, texts, vocab_size))


def _probe_texts(tokenizer) -> list[str]:
    texts = list(PROBE_TEXTS)
    if tokenizer.chat_template:
        try:
            texts.append(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": PROBE_QUESTION}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            )
        except Exception:  # a template that rejects the probe: the plain texts still check
            pass
    return texts


def _probe_batch(tokenizer, texts: list[str], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids and mask [len(texts), T], right-padded; text already holding a BOS (a
    rendered chat prompt) gets none added."""
    rows = []
    bos = tokenizer.bos_token
    for text in texts:
        add = not (bos and text.startswith(bos))
        ids = tokenizer(text, add_special_tokens=add)["input_ids"]
        rows.append([i for i in ids if i < vocab_size][:128])
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


@dataclass(frozen=True)
class _Agreement:
    max_diff: float  # max |logit diff|
    scale: float  # max |logit| of the model
    top1: float  # fraction of positions whose argmax agrees
    kld: float  # mean KL(model || file) per position, nats
    positions: int


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _compare(model, reloaded, ids, mask) -> _Agreement:
    """How the reloaded file's logits agree with the model's, over real tokens only."""
    ref = numpy_logits(model, ids, mask)
    got = numpy_logits(reloaded, ids, mask)
    keep = mask.astype(bool)
    ref, got = ref[keep], got[keep]
    lp, lq = _log_softmax(ref), _log_softmax(got)
    return _Agreement(
        max_diff=float(np.abs(ref - got).max()),
        scale=float(np.abs(ref).max()),
        top1=float((ref.argmax(-1) == got.argmax(-1)).mean()),
        kld=float((np.exp(lp) * (lp - lq)).sum(-1).mean()),
        positions=int(keep.sum()),
    )


def _check_tokenizer(path: Path, tokenizer, texts: list[str]) -> None:
    """The tokenizer built from the written metadata must encode like the trained one."""
    read = load_gguf_tokenizer(path)
    for text in texts:
        # Default special tokens: the BOS/EOS llama.cpp adds are part of what must agree.
        want = tokenizer(text)["input_ids"]
        got = read(text)["input_ids"]
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), None)
            at = min(len(want), len(got)) if at is None else at
            raise ExportError(
                f"{path.name}: the tokenizer read back from the file encodes {text[:40]!r} "
                f"differently from the model's (first difference at token {at}: "
                f"{want[at : at + 3]} vs {got[at : at + 3]}); nothing was written"
            )


def _general_kv(name: str, source: str | None, finetune: str | None) -> list:
    rows = [string_kv("general.name", name), string_kv("general.finetune", finetune)]
    if source:
        base = Path(str(source)).name
        rows += [
            ("general.base_model.count", 1, GGUFValueType.UINT32, None),
            string_kv("general.base_model.0.name", base),
            string_kv("general.source.url", str(source)),
        ]
    rows.append(string_kv("general.quantized_by", "jaxtune"))
    return rows


def export_gguf(
    model: nnx.Module,
    out: str | os.PathLike,
    *,
    tokenizer,
    kind: str = "f32",
    source: str | None = None,
    name: str | None = None,
    finetune: str | None = None,
    min_top1: float | None = None,
    chat_template: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> GGUFReport:
    """Writes ``out/<name>-<TYPE>.gguf`` and ``out/Modelfile``, verified; see the module doc.

    Args:
        model: a jaxtune causal LM of the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2,
            TinyLlama) or Gemma 3, with or without LoRA/DoRA (merged here).
        out: output directory, written atomically (``overwrite`` replaces an earlier
            jaxtune export only).
        tokenizer: the model's HF tokenizer (with the chat template it trained with).
        kind: a ``--gguf-type``: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1.
        source: where the base model came from (HF dir, .gguf or run dir; default
            ``model.source``): a .gguf base lends its tokenizer metadata as it is, an HF
            dir its ``tokenizer.model``.
        name: ``general.name`` and file stem (default: the source's name).
        finetune: ``general.finetune``, e.g. ``"lora"``.
        min_top1: top-1 agreement floor for quantized types (default :data:`MIN_TOP1`).
        chat_template: the chat template to write (and to build the Modelfile from) instead
            of the tokenizer's: for a model trained on a text prompt template
            (:func:`jaxtune.data.formats.prompt_chat_template`).
        progress: show a bar while tensors are written.

    Returns:
        A :class:`GGUFReport`.

    Raises:
        ConfigError: an unknown type, bottleneck adapters (no merged form), or a model or
            tokenizer llama.cpp cannot run as it is (found before anything is written).
        ExportError: a written file that does not reproduce the model; nothing is left
            at ``out``.
    """
    gtype = gguf_kind(kind)
    out = Path(out)
    check_out_dir(out, overwrite)  # before any work
    if chat_template is not None:
        tokenizer = copy.copy(tokenizer)  # the caller's tokenizer keeps its template
        tokenizer.chat_template = chat_template
    source = source if source is not None else getattr(model, "source", None)
    plain = dequantize_model(model)
    merged = merged_copy(plain)
    cfg = merged.config
    try:
        config = hf_module(family_of_config(cfg)).config_to_hf(cfg)
        export_arch(config)
    except (ValueError, ConfigError, KeyError) as e:
        raise ConfigError(f"GGUF export: this model cannot be written for llama.cpp: {e}") from None
    n_vocab = cfg.vocab_size
    gguf_src = _source_gguf(source)
    try:
        base_rows = (
            vocab.kv_from_gguf(gguf_src, n_vocab)
            if gguf_src is not None
            else vocab.kv_from_hf(tokenizer, _source_dir(source), n_vocab)
        )
    except ValueError as e:
        raise ConfigError(f"GGUF export: the tokenizer cannot be written: {e}") from None
    rows = {
        r[0]: r
        for r in base_rows + vocab.special_kv(tokenizer, n_vocab, turn_terminator(tokenizer))
    }
    stem = _slug(name or (Path(str(source)).stem if source else "model"))
    fname = f"{stem}-{gtype.label}.gguf"
    texts, ids, mask = probe_prompts(tokenizer, n_vocab)
    bar = Progress(f"writing {fname}", unit="tensor") if progress else None
    with atomic_dir(out, overwrite=overwrite) as tmp:
        path = tmp / fname
        try:
            write_gguf(
                path,
                config,
                lambda: iter_hf_tensors(merged, "float32"),
                list(rows.values()),
                _general_kv(stem, source, finetune),
                gtype,
                progress=bar,
            )
        except ValueError as e:
            raise ExportError(f"GGUF export: {e}") from None
        finally:
            if bar is not None:
                bar.close()
        modelfile = tmp / "Modelfile"
        add_bos = bool(rows.get("tokenizer.ggml.add_bos_token", (0, False))[1])
        modelfile.write_text(modelfile_text(tokenizer, fname, add_bos=add_bos))
        try:
            reloaded = from_pretrained(path, dtype="float32", scan_layers=cfg.scan_layers)
            agree = _compare(plain, reloaded, ids, mask)
            _check_tokenizer(path, tokenizer, texts)
        except ModelLoadError as e:  # jaxtune's own importer rejects what was written
            raise ExportError(f"GGUF export: the written file does not read back ({e})") from None
        finally:
            release_readers()  # the cached memory map names the temporary path
        limit = _check(gtype, model, agree, min_top1)
        size = path.stat().st_size
    return GGUFReport(
        out / fname,
        out / "Modelfile",
        gtype.name,
        size,
        agree.positions,
        agree.top1,
        agree.max_diff,
        agree.kld,
        limit,
    )


def _check(gtype: GGUFType, model, agree: _Agreement, floor: float | None) -> str:
    """Raises ExportError unless the reloaded file is close enough; returns the check."""
    diff, top1 = agree.max_diff, agree.top1
    if gtype.quantized:
        floor = MIN_TOP1[gtype.name] if floor is None else floor
        if not top1 >= floor:
            raise ExportError(
                f"GGUF export ({gtype.name}): top-1 agreement with the trained model is "
                f"{100 * top1:.1f}% (< {100 * floor:.0f}%, max |logit diff| {diff:.2e}); "
                "nothing was written; try a wider type (q8_0, f16)"
            )
        return f"top-1 >= {100 * floor:.0f}%"
    atol, rtol = default_tolerance(param_dtype(model))
    if gtype.name in FLOAT_TOLERANCE:
        atol, rtol = (
            max(a, b) for a, b in zip((atol, rtol), FLOAT_TOLERANCE[gtype.name], strict=True)
        )
    limit = atol + rtol * agree.scale
    if not diff <= limit:  # also catches NaN
        raise ExportError(
            f"GGUF export ({gtype.name}): the file read back differs from the trained model "
            f"(max |logit diff| {diff:.3e} > {limit:.1e}); nothing was written"
        )
    return f"max |logit diff| <= {limit:.1e}"
