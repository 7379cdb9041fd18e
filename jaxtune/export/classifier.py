"""Classifier export: a :class:`~jaxtune.models.heads.SequenceClassifier` as a verified HF
``*ForSequenceClassification`` directory (LoRA merged).

==========  =====================================  ===================================
family      HF class                               head in jaxtune terms
==========  =====================================  ===================================
bert        BertForSequenceClassification          pooling ``pooler``, linear + bias
distilbert  DistilBertForSequenceClassification    pooling ``cls``, MLP(D, relu) + bias
decoders    <Arch>ForSequenceClassification        pooling ``last``, linear, no bias
==========  =====================================  ===================================

The exported tokenizer carries jaxtune's text convention
(:func:`~jaxtune.export.classifier_tokenizer.export_tokenizer`: the EOS that
``data.add_eos`` appends, and a pad token that is not EOS, named by ``config.json``'s
``pad_token_id``), so ``pipeline("text-classification")`` and the ``Auto*`` classes
with default calls give jaxtune's logits; the export checks that with the exported
tokenizer files (no torch).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxtune.atomic import atomic_dir
from jaxtune.errors import ConfigError, ModelLoadError
from jaxtune.export.classifier_tokenizer import (
    check_exported_tokenizer,
    export_tokenizer,
    grow_embedding,
)
from jaxtune.hf import safetensors_io as st
from jaxtune.hf.classifier import head_vars, load_classifier, torch_layout
from jaxtune.hf.families import hf_module
from jaxtune.hf.io import iter_hf_tensors
from jaxtune.loading import load_tokenizer
from jaxtune.models import family_of_config
from jaxtune.models.heads import SequenceClassifier, is_encoder
from jaxtune.peft import merged_copy
from jaxtune.verify import check_logits, probe_batch


def _hf_layout(clf: SequenceClassifier) -> tuple[str, str]:
    """(HF architecture, base-tensor prefix) for ``clf``; ConfigError naming what differs.

    The message states each property of this classifier that the HF class cannot
    express (not the whole requirement), e.g. a fitted feature head's bias on a decoder.
    """
    cfg, head = clf.config, clf.head
    d = cfg.hidden_size
    if clf.feature_layer != -1:
        raise ConfigError(
            f"classifier export: the head reads hidden layer {clf.feature_layer!r}; HF "
            "*ForSequenceClassification heads read the final layer (peft.feature_layer: -1)"
        )
    bias = head.out.bias is not None
    fitted = " (heads fitted on cached features, peft.method: feature, have one)"
    problems: list[str] = []
    if cfg.family == "bert":
        arch, prefix = "BertForSequenceClassification", "bert."
        if clf.pooling != "pooler":
            problems.append(f"pooling is {clf.pooling!r}; {arch} reads the pooler")
        if head.dense is not None:
            problems.append(
                f"the head has a hidden layer (head_hidden {head.hidden}); {arch}'s "
                "classifier is one linear layer"
            )
        if not bias:
            problems.append(f"the head has no bias; {arch}'s classifier has one")
    elif cfg.family == "distilbert":
        arch, prefix = "DistilBertForSequenceClassification", "distilbert."
        if clf.pooling != "cls":
            problems.append(f"pooling is {clf.pooling!r}; {arch} reads the first token (cls)")
        if head.hidden != d or head.dense is None:
            problems.append(
                f"the head has head_hidden {head.hidden}; {arch} has a {d}-wide "
                "pre_classifier layer"
            )
        elif head.activation != "relu":
            problems.append(f"the head's activation is {head.activation}; {arch} uses relu")
        if not bias:
            problems.append(f"the head has no bias; {arch}'s layers have biases")
    elif not is_encoder(cfg):
        arch = hf_module(family_of_config(cfg)).config_to_hf(cfg)["architectures"][0]
        for suffix in ("ForCausalLM", "LMHeadModel"):
            arch = arch.replace(suffix, "ForSequenceClassification")
        prefix = ""
        if clf.pooling != "last":
            problems.append(f"pooling is {clf.pooling!r}; {arch} reads the last token")
        if head.dense is not None:
            problems.append(
                f"the head has a hidden layer (head_hidden {head.hidden}); {arch}'s score "
                "layer is one linear map"
            )
        if bias:
            problems.append(
                f"the head has a bias{fitted}; {arch}'s score layer has none (a head trained "
                "end to end has none: peft.method lora / full, or peft.unfreeze_top_layers)"
            )
    else:
        raise ConfigError(
            f"classifier export: transformers has no sequence-classification class for a "
            f"{cfg.family} backbone here (supported: BERT, DistilBERT, decoders)"
        )
    if problems:
        raise ConfigError(
            "classifier export: transformers has no class for this head: " + "; ".join(problems)
        )
    return arch, prefix


MERGE_TOL = 1e-3


def export_classifier(clf: SequenceClassifier, out, tokenizer=None, *, tol=1e-4) -> float:
    """Writes an HF ``*ForSequenceClassification`` dir and verifies it; returns max diff.

    LoRA/DoRA are merged; bottleneck adapters have no HF form (ConfigError). With a
    tokenizer (given, or from the backbone's source) the directory behaves in
    transformers' standard use (``pipeline("text-classification")``, or
    ``AutoTokenizer`` + ``AutoModelForSequenceClassification`` with default calls) as
    the classifier does in jaxtune (:func:`export_tokenizer`): the exported tokenizer
    adds what jaxtune's data pipeline adds (BOS, EOS), and pads with a token of its own
    that ``config.json``'s ``pad_token_id`` names, so HF's decoder heads, which pool the
    last token that is not ``pad_token_id``, pool the token jaxtune pools.

    The directory is written atomically and removed again unless (1) the exported
    tokenizer, batched with ``padding=True``, gives jaxtune's token ids for probe texts
    and HF's pooled position is jaxtune's, and (2) the reloaded classifier's logits on
    that batch (and on random ids) differ from the merged classifier's by at most ``tol``
    (+ relative), and from ``clf``'s (unmerged) by at most ``MERGE_TOL`` (+ relative).
    Prints nothing: callers report the returned difference.
    """

    arch, prefix = _hf_layout(clf)
    reference = merged_copy(clf)  # the classifier the written weights hold
    backbone = reference.backbone
    cfg = backbone.config
    config = hf_module(family_of_config(cfg)).config_to_hf(cfg)
    names = clf.label_names or tuple(f"LABEL_{i}" for i in range(clf.num_labels))
    config.update(
        architectures=[arch],
        id2label={str(i): n for i, n in enumerate(names)},
        label2id={n: i for i, n in enumerate(names)},
        problem_type="single_label_classification",
    )
    if tokenizer is None and getattr(backbone, "source", None):
        try:
            tokenizer = load_tokenizer(backbone.source)
        except ModelLoadError:
            tokenizer = None
    tensors = {
        prefix + name: arr
        for name, arr in iter_hf_tensors(backbone)
        if not name.startswith("lm_head.")
    }
    tensors.update({n: torch_layout(n, np.asarray(v[...])) for n, v in head_vars(clf).items()})
    exported = None
    if tokenizer is not None:
        exported = export_tokenizer(tokenizer, clf, cfg.vocab_size)
        if exported.vocab_size > cfg.vocab_size:  # one new row: the pad token's (never read)
            grow_embedding(tensors, cfg.vocab_size, exported.vocab_size)
            config["vocab_size"] = exported.vocab_size
        config["pad_token_id"] = exported.pad_id
    elif not is_encoder(cfg) and config.get("pad_token_id") is None:
        # No tokenizer to carry a convention: HF decoder heads need some pad id to batch.
        eos = cfg.eos_token_id
        eos = eos[0] if isinstance(eos, tuple) else eos
        config["pad_token_id"] = eos if eos is not None and eos < cfg.vocab_size else 0
    out = Path(out)
    with atomic_dir(out) as tmp:
        config["dtype"] = str(next(iter(tensors.values())).dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        st.write_file(tmp / "model.safetensors", tensors)
        reloaded = load_classifier(tmp, scan_layers=cfg.scan_layers)
        pad = config.get("pad_token_id") or 0
        probe = probe_batch(cfg.vocab_size, pad if pad < cfg.vocab_size else 0)
        checks = [(probe, probe)]
        if exported is not None:
            exported.save(tmp)
            checks.insert(0, check_exported_tokenizer(tmp, tokenizer, clf, exported.pad_id))
        # Tight: the files hold the merged classifier. Loose against the unmerged one:
        # folding LoRA into the weights changes float rounding, and a classifier's logits
        # can be a small difference of large pooled features (a random GPT-2 with
        # LoRA + 0.1 differs by 6e-4 at logits of 2.5), yet a wrong merge is still caught.
        check_logits(clf, reloaded, checks, (MERGE_TOL, MERGE_TOL), "classifier export (merge)")
        return check_logits(reference, reloaded, checks, (tol, tol), "classifier export")
