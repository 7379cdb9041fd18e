"""Public Python API: ``from_pretrained``, ``save_pretrained``, ``load_tokenizer``, ``convert``,
``save_checkpoint``.

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
from jaxtune.export.hf import save_pretrained
from jaxtune.loading import from_pretrained, load_tokenizer

__all__ = ["convert", "from_pretrained", "load_tokenizer", "save_checkpoint", "save_pretrained"]


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
