"""HF ``*ForSequenceClassification`` directories: recognising and loading them.

The head's tensors by family (``score`` for decoders, ``classifier`` for BERT,
``pre_classifier`` + ``classifier`` for DistilBERT) are one table,
:func:`head_vars`, used both here and by the export
(:mod:`jaxtune.export.classifier`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import ModelLoadError
from jaxtune.hf import io as hf_io
from jaxtune.hf.families import hf_module
from jaxtune.models import family_for_model_type, resolve_dtype
from jaxtune.models.heads import SequenceClassifier

HEAD_TENSORS = ("classifier.", "pre_classifier.", "score.")


CLASSIFICATION_KEYS = ("id2label", "label2id", "num_labels", "problem_type", "architectures")


def head_vars(clf: SequenceClassifier) -> dict[str, nnx.Variable]:
    """HF tensor name -> head variable, the one table for export and import.

    HF names: ``score`` (decoders, no bias), ``classifier`` (BERT), ``pre_classifier`` +
    ``classifier`` (DistilBERT). Kernels are transposed to torch's [out, in].
    """
    out, dense = clf.head.out, clf.head.dense
    names = {} if dense is None else {"pre_classifier.weight": dense.kernel}
    if dense is not None and dense.bias is not None:
        names["pre_classifier.bias"] = dense.bias
    if out.bias is None:
        return {**names, "score.weight": out.kernel}
    return {**names, "classifier.weight": out.kernel, "classifier.bias": out.bias}


def torch_layout(name: str, x: np.ndarray) -> np.ndarray:
    """A head tensor between jaxtune ([in, out] kernels) and torch ([out, in]) layouts."""
    return np.ascontiguousarray(x.T if name.endswith("weight") else x)  # involution


def is_classifier_dir(path: Path) -> bool:
    """Is ``path`` an HF directory of a ``*ForSequenceClassification`` model?"""
    try:
        archs = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def load_classifier(path, dtype="float32", *, scan_layers: bool | None = None):
    """Loads an HF ``*ForSequenceClassification`` dir as a :class:`SequenceClassifier`."""

    path = Path(path)
    cfg_path = path / "config.json"
    try:
        d = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{cfg_path}: cannot read ({e})") from None
    arch = (d.get("architectures") or [""])[0]
    fam = family_for_model_type(d.get("model_type"))
    if fam is None or not arch.endswith("ForSequenceClassification"):
        raise ModelLoadError(f"{cfg_path}: {arch!r} is not a supported sequence classifier")
    base = {k: v for k, v in d.items() if k not in CLASSIFICATION_KEYS}
    cfg = hf_module(fam).config_from_hf(base, str(cfg_path))
    fields = {f.name for f in dataclasses.fields(cfg)}
    if "tie_word_embeddings" in fields:
        cfg = cfg.replace(tie_word_embeddings=True)  # a classifier checkpoint has no LM head
    if scan_layers is not None:
        cfg = cfg.replace(scan_layers=scan_layers)
    id2label = d.get("id2label") or {}
    names = tuple(id2label[k] for k in sorted(id2label, key=int)) if id2label else None
    head: dict[str, np.ndarray] = {}

    def base_tensors():
        for name, arr, fname in hf_io.iter_safetensors(hf_io.safetensors_files(path)):
            if name.startswith(HEAD_TENSORS):
                head[name] = np.asarray(arr)
            else:
                yield name, arr, fname

    backbone = hf_io.load_params(cfg, base_tensors(), dtype=resolve_dtype(dtype), source=str(path))
    backbone.source = str(path)
    k = len(names) if names else int(d.get("num_labels", 2))
    if "pre_classifier.weight" in head:  # DistilBERT: CLS -> dense -> relu -> classifier
        opts = dict(pooling="cls", head_hidden=cfg.hidden_size, head_activation="relu")
    else:  # BERT reads its pooler; decoders the last token, with a bias-free score
        opts = dict(pooling="last", head_bias=False) if "score.weight" in head else {}
        opts = opts or dict(pooling="pooler")
    clf = SequenceClassifier(backbone, k, label_names=names, **opts)
    for name, var in head_vars(clf).items():
        if name not in head:
            raise ModelLoadError(f"{path}: missing tensor {name!r}")
        arr = torch_layout(name, head.pop(name))
        if arr.shape != var.shape:
            raise ModelLoadError(
                f"{path}: {name} has shape {arr.T.shape}, expected {var.shape[::-1]}"
            )
        var.set_value(jnp.asarray(arr, var.dtype))
    if head:
        raise ModelLoadError(f"{path}: unexpected head tensors {sorted(head)}")
    return clf
