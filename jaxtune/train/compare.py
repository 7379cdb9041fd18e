"""One classification experiment from a run config, for comparing fine-tuning methods
(``scripts/compare_methods.py``): train on ``train``, score on ``test`` (else
``validation``), return one row of the comparison table.

``peft.method: feature`` with nothing unfrozen fits a head on cached features
(:func:`jaxtune.feature_heads.feature_run`); every other method trains a
:class:`~jaxtune.models.heads.SequenceClassifier` end to end with the one trainer
(:func:`jaxtune.train.loop.train`, the classification task) in a temporary run
directory (the experiment's output is its result row; the directory is removed), then
scores it with the one prediction loop (:func:`jaxtune.eval.classification.predict`).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

from flax import nnx

from jaxtune.eval.classification import classification_metrics, predict
from jaxtune.feature_heads import classification_data, feature_head, feature_only, feature_run
from jaxtune.loading import from_pretrained
from jaxtune.peft.trainable import classifier_filter, summary
from jaxtune.train.loop import train


def run(cfg, *, feature: dict | None = None, log=print) -> dict:
    """One classification run (train on ``train``, evaluate on ``test``, else ``validation``).

    Args:
      cfg: run config with ``data.format: classification`` and ``peft.head:
        classification``.
      feature: options of the cached-feature path (:func:`jaxtune.feature_heads.feature_run`);
        and ``init_head``: end-to-end methods start from the head fitted on cached
        features (LP-FT, Kumar et al. 2022) instead of a random one.

    Returns:
      A JSON-able dict: ``method``, ``accuracy``, ``macro_f1``, ``n``, ``majority``,
      ``trainable_params``, ``total_params``, ``seconds`` and method details (end to
      end: ``steps``, ``history`` (the logged training rows), ``train_seconds``, and the
      trained classifier under ``_model``, not JSON).
    """
    feature = dict(feature or {})
    if feature_only(cfg):
        return feature_run(cfg, feature=feature, log=log)
    t0 = time.perf_counter()
    datasets, result = classification_data(cfg)
    k, ev = result["num_labels"], result["eval_split"]
    init_model = None
    if feature.get("init_head"):  # LP-FT: same structure, fitted on frozen features

        def init_model(clf):
            kw = dict(use_bias=clf.head.out.bias is not None, activation=clf.head.activation)
            splits = {"train": datasets["train"]}
            head, *_, hinfo = feature_head(cfg, feature, splits, k, log=log, **kw)
            nnx.update(clf.head, nnx.state(head, nnx.Param))
            result["init_head"] = {
                "l2": hinfo["l2"],
                "train_accuracy": hinfo["train_accuracy"],
            }

    with tempfile.TemporaryDirectory(prefix="jaxtune-compare-") as tmp:
        run_dir = Path(tmp) / "run"
        peft = dataclasses.replace(
            cfg.peft,
            head="classification",
            feature_layer=feature.get("layer", cfg.peft.feature_layer),
        )
        run_cfg = dataclasses.replace(
            cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir)), peft=peft
        )
        out = train(run_cfg, init_model=init_model)
        clf = from_pretrained(run_dir)
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    info = summary(clf, classifier_filter(clf, run_cfg.peft))
    log(info["text"])
    logits, gold = predict(clf, datasets[ev], cfg.train.batch_size)
    m = classification_metrics(logits.argmax(-1), gold, k)
    result.update(
        trainable_params=info["trainable"],
        total_params=info["total"],
        steps=out["steps"],
        history=[r for r in history if "loss" in r],
        train_seconds=out["seconds"],
        accuracy=m["accuracy"],
        macro_f1=m["macro_f1"],
        n=m["n"],
        confusion=m["confusion"],
        seconds=time.perf_counter() - t0,
        _model=clf,  # for callers that export; not JSON
    )
    return result
