"""``save_pretrained``: a jaxtune model as an HF directory transformers loads (adapters merged)."""

from __future__ import annotations

import os
from pathlib import Path

from flax import nnx

from jaxtune.atomic import check_out_dir, overwriting
from jaxtune.errors import ModelLoadError
from jaxtune.export.classifier import export_classifier
from jaxtune.hf.io import save_hf
from jaxtune.loading import load_tokenizer
from jaxtune.models.heads import SequenceClassifier
from jaxtune.peft import merged_copy
from jaxtune.quant import dequantize_model


def save_pretrained(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    dtype=None,
    overwrite: bool = False,
) -> Path:
    """Writes an HF directory (adapters merged) that transformers loads.

    ``out_dir`` is written atomically. An existing non-empty ``out_dir`` is refused
    (``OutputError``) unless ``overwrite``, which replaces an earlier jaxtune export
    only, never a directory holding anything else. The tokenizer is copied from
    ``model.source`` when not given. A
    ``SequenceClassifier`` becomes a verified ``*ForSequenceClassification`` dir
    (``jaxtune.export.classifier.export_classifier``; weights keep their dtype). Quantized
    kernels are dequantized first, then LoRA is merged into them (as PEFT merges into
    bitsandbytes models): the files hold dense weights.
    """

    check_out_dir(out_dir, overwrite)  # before any work
    model = dequantize_model(model)

    if isinstance(model, SequenceClassifier):
        with overwriting(overwrite):
            export_classifier(model, out_dir, tokenizer=tokenizer)
        return Path(out_dir)
    if tokenizer is None and getattr(model, "source", None):
        try:
            tokenizer = load_tokenizer(model.source)
        except ModelLoadError:
            tokenizer = None
    return save_hf(
        merged_copy(model), out_dir, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite
    )
