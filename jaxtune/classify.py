"""Sequence classification on any backbone: train, evaluate, export to / load from HF.

:func:`run` is one classification run from a run config (``data.format:
classification``): ``peft.method: feature`` without unfrozen layers trains a head on
cached features (:mod:`jaxtune.features`); every other method (full, lora, dora,
adapter, feature + ``unfreeze_top_layers``) trains a :class:`~jaxtune.models.heads.
SequenceClassifier` end to end with the same optimizer chain as the LM trainer, its
trainable set given by :func:`~jaxtune.models.heads.classifier_filter`.

:func:`export_classifier` writes an HF ``*ForSequenceClassification`` directory (LoRA
merged) and verifies it by reloading it with :func:`load_classifier` (the inverse;
``jaxtune.from_pretrained`` calls it for such directories):

==========  =====================================  ===================================
family      HF class                               head in jaxtune terms
==========  =====================================  ===================================
bert        BertForSequenceClassification          pooling ``pooler``, linear + bias
distilbert  DistilBertForSequenceClassification    pooling ``cls``, MLP(D, relu) + bias
decoders    <Arch>ForSequenceClassification        pooling ``last``, linear, no bias
==========  =====================================  ===================================

The exported tokenizer carries jaxtune's text convention (:func:`~jaxtune.classifier_tokenizer.export_tokenizer`: the
EOS that ``data.add_eos`` appends, and a pad token that is not EOS, named by
``config.json``'s ``pad_token_id``), so ``pipeline("text-classification")`` and the
``Auto*`` classes with default calls give jaxtune's logits; the export checks that with
the exported tokenizer files (:func:`check_exported_tokenizer`, no torch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxtune.classifier_tokenizer import check_exported_tokenizer, export_tokenizer, grow_embedding
from jaxtune.errors import ConfigError, ModelLoadError
from jaxtune.models.heads import SequenceClassifier, classifier_filter, is_encoder

HEAD_TENSORS = ("classifier.", "pre_classifier.", "score.")
CLASSIFICATION_KEYS = ("id2label", "label2id", "num_labels", "problem_type", "architectures")

# ------------------------------------------------------------------------ building


def build_classifier(cfg, num_labels: int, label_names=None, layer=None) -> SequenceClassifier:
    """Backbone from ``cfg.model`` + head from ``cfg.peft``, with the method's PEFT applied.

    Layers are unscanned when ``peft.unfreeze_top_layers`` is set (a stacked parameter
    cannot be partly trainable).
    """
    from jaxtune.api import from_pretrained
    from jaxtune.peft import apply_peft

    backbone = from_pretrained(
        cfg.model.path,
        dtype=cfg.model.dtype,
        scan_layers=cfg.model.scan_layers and not cfg.peft.unfreeze_top_layers,
        remat=cfg.model.remat,
        attention_impl=cfg.model.attention,
        mlp_chunks=cfg.model.mlp_chunks,
        quantize=cfg.model.quantize,
    )
    if cfg.model.compute_dtype:
        backbone.compute_dtype = jnp.dtype(cfg.model.compute_dtype)
    apply_peft(backbone, cfg.peft, rngs=nnx.Rngs(cfg.train.seed))
    p = cfg.peft
    # A head fitted on cached features (``peft.method: feature``, nothing unfrozen) has
    # train_head's structure: biases (the features are centred) and relu.
    fitted = p.method == "feature" and not p.unfreeze and not p.unfreeze_top_layers
    head_kw = dict(head_bias=True, head_activation="relu") if fitted else {}
    return SequenceClassifier(
        backbone,
        num_labels,
        pooling=p.pooling,
        feature_layer=p.feature_layer if layer is None else layer,
        head_hidden=p.head_hidden,
        label_names=label_names,
        add_eos=cfg.data.add_eos,
        rngs=nnx.Rngs(cfg.train.seed + 1),
        **head_kw,
    )


# ------------------------------------------------------------------------ training


def _loss(clf, batch, rng):
    """Mean cross-entropy over rows with a label (label -1 = padding row)."""
    logits = clf(batch["input_ids"], batch["attention_mask"], rng=rng)
    labels = batch["labels"]
    valid = (labels >= 0).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    n = jnp.maximum(valid.sum(), 1.0)
    correct = jnp.sum((logits.argmax(-1) == labels) * valid)
    return jnp.sum(nll * valid) / n, correct / n


def make_classifier_step(graphdef, tx, *, dropout: bool = False):
    """``step(state, frozen, batch) -> (state, metrics)``; grads for the trainable part only.

    ``state`` = ``{"step", "params", "opt_state", "seed"}``; per-step dropout keys are
    ``fold_in(key(seed), step)`` (reproducible on resume, like the LM trainer).
    """

    def step(state, frozen, batch):
        key = jax.random.fold_in(jax.random.key(state["seed"]), state["step"]) if dropout else None

        def loss_of(params):
            return _loss(nnx.merge(graphdef, params, frozen), batch, key)

        (loss, acc), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new, {"loss": loss, "accuracy": acc, "grad_norm": optax.tree.norm(grads)}

    return step


def _device(batch: dict) -> dict:
    return {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "labels")}


def train_classifier(clf, filt, train_ds, cfg, *, log=print) -> tuple[SequenceClassifier, dict]:
    """Trains ``clf``'s trainable partition on a classification split.

    Args:
      clf: the classifier (PEFT already applied).
      filt: its trainable filter (:func:`classifier_filter`).
      train_ds: a classification ``TokenizedDataset``.
      cfg: run config (``train.steps`` or ``train.epochs``, ``train.batch_size``,
        ``train.seed``, ``optim``, ``peft.dropout``).

    Returns:
      (trained classifier, info with ``steps``, ``history`` rows and ``seconds``).
    """
    from jaxtune.data import BatchIterator
    from jaxtune.optim import build_optimizer

    t0 = time.perf_counter()
    graphdef, params, frozen = nnx.split(clf, filt, ...)
    it = BatchIterator(
        train_ds, cfg.train.batch_size, seed=cfg.train.seed, shuffle=cfg.data.shuffle
    )
    steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * it.steps_per_epoch))
    tx = build_optimizer(cfg.optim, steps, params)
    state = {
        "step": jnp.asarray(0, jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "seed": jnp.asarray(cfg.train.seed, jnp.uint32),
    }
    step_fn = jax.jit(
        make_classifier_step(graphdef, tx, dropout=cfg.peft.dropout > 0), donate_argnums=(0,)
    )
    history = []
    every = max(1, steps // 10)
    for i in range(steps):
        state, m = step_fn(state, frozen, _device(next(it)))
        if (i + 1) % every == 0 or i + 1 == steps:
            row = {"step": i + 1, **{k: float(v) for k, v in m.items()}}
            if not math.isfinite(row["loss"]):
                raise ConfigError(f"classification loss became {row['loss']} at step {i + 1}")
            history.append(row)
            log(f"step {i + 1}/{steps} loss {row['loss']:.4f} acc {row['accuracy']:.3f}")
    trained = nnx.merge(graphdef, state["params"], frozen)
    return trained, {"steps": steps, "history": history, "seconds": time.perf_counter() - t0}


@nnx.jit
def _logits(clf, ids, mask):
    return clf(ids, mask)


def predict(clf, dataset, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(logits float32 [N, K], gold labels int [N]) over a split, in dataset order."""
    from jaxtune.data import BatchIterator

    it = BatchIterator(dataset, batch_size, shuffle=False, drop_remainder=False, num_epochs=1)
    logits, gold = [], []
    for batch in it:
        keep = batch["labels"] >= 0
        out = np.asarray(_logits(clf, batch["input_ids"], batch["attention_mask"]))
        logits.append(out[keep])
        gold.append(batch["labels"][keep])
    return np.concatenate(logits), np.concatenate(gold)


# --------------------------------------------------------------------------- runs


def run(cfg, *, feature: dict | None = None, log=print) -> dict:
    """One classification run (train on ``train``, evaluate on ``test``, else ``validation``).

    Args:
      cfg: run config with ``data.format: classification``.
      feature: options of the cached-feature path: ``cache_dir``, ``layer`` (overrides
        ``peft.feature_layer``; ``"mean"`` averages layers), ``normalize``,
        ``head_steps``, ``head_lr``, ``l2`` (number or ``auto``), ``l2_grid``, ``folds``
        (see :func:`jaxtune.features.train_head`), ``batch_size`` (forward); and
        ``init_head``: end-to-end methods start from the head fitted on cached
        features (LP-FT, Kumar et al. 2022) instead of a random one.

    Returns:
      A JSON-able dict: ``method``, ``accuracy``, ``macro_f1``, ``n``, ``majority``,
      ``trainable_params``, ``total_params``, ``seconds`` and method details (the
      trained classifier under ``_model`` for end-to-end methods).
    """
    from jaxtune.api import load_tokenizer
    from jaxtune.data import build_datasets
    from jaxtune.eval.classification import classification_metrics
    from jaxtune.features import feature_head, predict_head
    from jaxtune.peft import summary

    t0 = time.perf_counter()
    if cfg.data.format != "classification":
        raise ConfigError("data.format: classification runs need format classification")
    feature = dict(feature or {})
    datasets = build_datasets(cfg.data, load_tokenizer(cfg.model.path), cfg.train.seq_len)
    ev = "test" if "test" in datasets else "validation"
    if ev not in datasets:
        raise ConfigError("classification run: needs a test or validation split to evaluate")
    train_ds, eval_ds = datasets["train"], datasets[ev]
    names = train_ds.label_names
    k = cfg.peft.num_labels or len(names)
    majority = np.bincount(train_ds.labels, minlength=k).argmax()
    result = {
        "method": cfg.peft.method,
        "model": cfg.model.path,
        "eval_split": ev,
        "train_examples": train_ds.num_examples,
        "majority": float(np.mean(eval_ds.labels == majority)),
    }
    peft = cfg.peft
    if peft.method == "feature" and not peft.unfreeze and not peft.unfreeze_top_layers:
        splits = {"train": train_ds, ev: eval_ds}
        head, feats, infos, hinfo = feature_head(cfg, feature, splits, k, log=log)
        logits, gold = predict_head(head, feats[ev]), eval_ds.labels
        n_head = sum(x.size for x in jax.tree.leaves(nnx.state(head, nnx.Param)))
        result.update(
            trainable_params=int(n_head),
            total_params=int(infos["train"]["manifest"]["backbone_params"] + n_head),
            feature_cache={
                s: {key: i[key] for key in ("key", "hit", "forward_batches", "seconds")}
                for s, i in infos.items()
            },
            head_seconds=hinfo["seconds"],
            head_l2=hinfo["l2"],
            _head=head,  # for callers that save it (``jaxtune train``); not JSON
            _labels={"num_labels": int(k), "label_names": names if len(names) == k else None},
        )
    else:
        layer = feature.get("layer", peft.feature_layer)
        clf = build_classifier(cfg, k, tuple(names) if len(names) == k else None, layer)
        if feature.get("init_head"):  # LP-FT: same structure, fitted on frozen features
            kw = dict(use_bias=clf.head.out.bias is not None, activation=clf.head.activation)
            head, *_, hinfo = feature_head(cfg, feature, {"train": train_ds}, k, log=log, **kw)
            nnx.update(clf.head, nnx.state(head, nnx.Param))
            result["init_head"] = {"l2": hinfo["l2"], "train_accuracy": hinfo["train_accuracy"]}
        filt = classifier_filter(clf, peft)
        info = summary(clf, filt)
        log(info["text"])
        clf, tinfo = train_classifier(clf, filt, train_ds, cfg, log=log)
        logits, gold = predict(clf, eval_ds, cfg.train.batch_size)
        result.update(
            trainable_params=info["trainable"],
            total_params=info["total"],
            steps=tinfo["steps"],
            history=tinfo["history"],
            train_seconds=tinfo["seconds"],
            _model=clf,  # for callers that export; not JSON
        )
    m = classification_metrics(logits.argmax(-1), gold, k)
    result.update(
        accuracy=m["accuracy"],
        macro_f1=m["macro_f1"],
        n=m["n"],
        confusion=m["confusion"],
        seconds=time.perf_counter() - t0,
    )
    return result


# ------------------------------------------------------------------ HF export / load


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
        from jaxtune.models import family_of_config

        arch = family_of_config(cfg).hf_module().config_to_hf(cfg)["architectures"][0]
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


def _head_vars(clf: SequenceClassifier) -> dict[str, nnx.Variable]:
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


def _torch_layout(name: str, x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T if name.endswith("weight") else x)  # involution


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
    that batch (and on random ids) differ from ``clf``'s by at most ``tol`` (+ relative).
    Prints nothing: callers report the returned difference.
    """
    from jaxtune.atomic import atomic_dir
    from jaxtune.hf import safetensors_io as st
    from jaxtune.hf.io import iter_hf_tensors
    from jaxtune.models import family_of_config
    from jaxtune.peft import merged_copy
    from jaxtune.peft.export import ExportError

    arch, prefix = _hf_layout(clf)
    backbone = merged_copy(clf.backbone)
    cfg = backbone.config
    config = family_of_config(cfg).hf_module().config_to_hf(cfg)
    names = clf.label_names or tuple(f"LABEL_{i}" for i in range(clf.num_labels))
    config.update(
        architectures=[arch],
        id2label={str(i): n for i, n in enumerate(names)},
        label2id={n: i for i, n in enumerate(names)},
        problem_type="single_label_classification",
    )
    if tokenizer is None and getattr(backbone, "source", None):
        from jaxtune.api import load_tokenizer

        try:
            tokenizer = load_tokenizer(backbone.source)
        except ModelLoadError:
            tokenizer = None
    tensors = {
        prefix + name: arr
        for name, arr in iter_hf_tensors(backbone)
        if not name.startswith("lm_head.")
    }
    tensors.update({n: _torch_layout(n, np.asarray(v[...])) for n, v in _head_vars(clf).items()})
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
        diff = 0.0
        for ours, theirs in checks:  # (jaxtune's batch, the same texts as HF batches them)
            ref = np.asarray(_logits(clf, *ours))
            got = np.asarray(_logits(reloaded, *theirs))
            d = float(np.abs(ref - got).max())
            limit = tol + tol * float(np.abs(ref).max())
            if not d <= limit:
                raise ExportError(
                    f"classifier export: reloaded logits differ by {d:.3e} > {limit:.1e}; "
                    "nothing was written"
                )
            diff = max(diff, d)
    return diff


def probe_batch(vocab: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (ids, mask) int32 [2, 16]; row 1 right-padded with ``pad_id`` after 11 tokens.

    Real tokens avoid ``pad_id`` so HF's pad-id-based last-token search agrees.
    """
    ids = np.random.RandomState(0).randint(1, min(vocab, 32000), (2, 16)).astype(np.int32)
    ids[ids == pad_id] = 1 if pad_id != 1 else 2
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    ids[1, 11:] = pad_id
    return ids, mask


def is_classifier_dir(path: Path) -> bool:
    """Is ``path`` an HF directory of a ``*ForSequenceClassification`` model?"""
    try:
        archs = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def load_classifier(path, dtype="float32", *, scan_layers: bool | None = None):
    """Loads an HF ``*ForSequenceClassification`` dir as a :class:`SequenceClassifier`."""
    from jaxtune.api import resolve_dtype
    from jaxtune.hf import io as hf_io
    from jaxtune.models import family_for_model_type

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
    cfg = fam.hf_module().config_from_hf(base, str(cfg_path))
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
    for name, var in _head_vars(clf).items():
        if name not in head:
            raise ModelLoadError(f"{path}: missing tensor {name!r}")
        arr = _torch_layout(name, head.pop(name))
        if arr.shape != var.shape:
            raise ModelLoadError(
                f"{path}: {name} has shape {arr.T.shape}, expected {var.shape[::-1]}"
            )
        var.set_value(jnp.asarray(arr, var.dtype))
    if head:
        raise ModelLoadError(f"{path}: unexpected head tensors {sorted(head)}")
    return clf
