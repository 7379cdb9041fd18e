"""Public Python API: ``from_pretrained``, ``save_pretrained``, ``export_gguf``,
``load_tokenizer``, ``convert``, ``save_checkpoint``, ``compare``.

A thin front over the layers that do the work: loading (:mod:`jaxtune.loading`: HF dir,
``.gguf``, jaxtune checkpoint, classifier dir, run dir), exporting
(:mod:`jaxtune.export.hf`) and checkpoints (:mod:`jaxtune.checkpoint`). Nothing inside
jaxtune imports this module.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxtune.atomic import check_out_dir
from jaxtune.checkpoint import save_checkpoint
from jaxtune.errors import ConfigError
from jaxtune.eval.compare import compare_models
from jaxtune.export.gguf import GGUFReport
from jaxtune.export.gguf import export_gguf as _export_gguf
from jaxtune.export.hf import save_pretrained
from jaxtune.loading import from_pretrained, load_tokenizer

__all__ = [
    "compare",
    "convert",
    "export_gguf",
    "from_pretrained",
    "load_tokenizer",
    "save_checkpoint",
    "save_pretrained",
]


def export_gguf(
    model, out: str | os.PathLike, kind: str = "f32", *, tokenizer=None, **options
) -> GGUFReport:
    """Writes ``out/<name>-<TYPE>.gguf`` + an Ollama ``Modelfile``, verified against ``model``.

    ``kind``: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1. The tokenizer defaults to
    the one of ``model.source``. ``options``: see :func:`jaxtune.export.gguf.export_gguf`
    (``name``, ``finetune``, ``min_top1``, ``overwrite``, ...). Returns a report whose
    ``summary()`` says what was written and how close it is to ``model``.
    """
    check_out_dir(out, options.get("overwrite", False))  # before loading anything
    if tokenizer is None:
        if not getattr(model, "source", None):
            raise ConfigError("export_gguf: pass tokenizer= (the model has no source path)")
        tokenizer = load_tokenizer(model.source)
    return _export_gguf(model, out, tokenizer=tokenizer, kind=kind, **options)


def convert(
    src: str | os.PathLike, out: str | os.PathLike, dtype="float32", *, overwrite: bool = False
) -> Path:
    """HF dir / .gguf -> jaxtune checkpoint (params + resolved config + tokenizer).

    ``overwrite``: replace an earlier jaxtune output at ``out`` (else it is refused).
    """
    check_out_dir(out, overwrite)  # before loading anything
    # Tokenizer first: its build peak then never stacks on top of the loaded weights.
    tokenizer = load_tokenizer(src)
    model = from_pretrained(src, dtype=dtype)
    return save_checkpoint(model, out, tokenizer=tokenizer, overwrite=overwrite)


def compare(
    models: list[str], prompts: str | os.PathLike, judge: str, out: str | os.PathLike, **options
) -> dict:
    """Pairwise comparison of models on a prompt file: win matrix, Elo, side-by-side page.

    ``models``: two or more paths :func:`from_pretrained` loads; ``prompts``: JSONL of
    ``{"prompt", "reference" (optional)}``; ``judge``: ``exact``, ``f1``, ``rougeL`` or a
    judge model path. Writes ``out`` (samples, judgments, results.json/.md, compare.html,
    ratings.png). ``options``: see :func:`jaxtune.eval.compare.compare_models` (``sampling``,
    ``chat``, ``bootstrap``, ``seed``, ``template``, ``overwrite``, ...). Returns the
    ``results.json`` content plus ``"files"``.
    """
    return compare_models(list(models), str(prompts), judge, str(out), **options)
