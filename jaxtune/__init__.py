"""jaxtune: fine-tune pretrained language models in JAX/Flax NNX.

Public API (kept stable)::

    model = jaxtune.from_pretrained(path, dtype="float32")   # HF dir, .gguf, checkpoint, run dir
    logits = model(input_ids)                                 # int32 [B, T] -> float32 [B, T, V]
    jaxtune.save_pretrained(model, out_dir)                   # HF dir, adapters merged

Imports are lazy so ``import jaxtune`` stays light (and never imports torch).
"""

from __future__ import annotations

import os

# jaxtune never uses torch: transformers' "PyTorch was not found. Models won't be
# available..." advice (printed when it is imported without torch) is noise to a jaxtune
# user. It is an "advisory" warning; set before transformers is first imported (it is
# only ever imported through jaxtune's modules). A user's own setting wins.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

_API = {
    "from_pretrained": "jaxtune.api",
    "save_pretrained": "jaxtune.api",
    "load_tokenizer": "jaxtune.api",
    "convert": "jaxtune.api",
    "export_gguf": "jaxtune.api",
    "save_checkpoint": "jaxtune.api",
    "compare": "jaxtune.api",
    "generate_data": "jaxtune.api",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'jaxtune' has no attribute {name!r}")
