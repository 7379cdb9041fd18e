"""Sequence classification (``peft.head: classification``) as a task of the one trainer.

End-to-end methods (full, LoRA, DoRA, adapters, feature + unfrozen top layers) train a
:class:`~jaxtune.models.heads.SequenceClassifier` through the same sharded step,
checkpoints, exact resume, validation and logging as language models; the loss is
cross-entropy over the labels. What the task adds:

- the label set, fixed when the run starts and kept in the run directory
  (``labels.json``, one of :meth:`Classification.run_files`), so a resumed run and
  ``jaxtune export`` rebuild the same head; a resumed run whose data has other labels
  is refused before anything is written;
- validation loss / accuracy / macro-F1, and a final report (accuracy, macro-F1,
  confusion matrix, per-class precision / recall / F1) on the test split (else
  validation) -> ``classification_report.{json,md}``, with the counterfactual bias probe
  (``eval.bias_probe``: flip rate and score gap per attribute,
  :mod:`jaxtune.eval.counterfactual`);
- ``data.balance: weight``: inverse-frequency class weights of the train split in the
  loss, fixed when the run starts and kept in ``class_weights.json`` (a resumed run
  whose data gives other weights is refused, as for labels). Validation loss stays
  unweighted (the data as it is);
- ``peft.method: feature`` with nothing unfrozen has no backbone gradients at all: it
  is fitted without steps (features cached once, then a head fitted in seconds,
  :func:`jaxtune.feature_heads.feature_run`), writes the same report and checkpoints the
  head, so the run loads back as the trained classifier.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxtune.atomic import atomic_file
from jaxtune.checkpoint import Checkpointer
from jaxtune.data.balance import balance_line, class_weight_info
from jaxtune.errors import ConfigError
from jaxtune.eval.bias_probe import classifier_probe, load_probe
from jaxtune.eval.classification import classifier_metrics, per_class, per_class_markdown
from jaxtune.eval.counterfactual import report_section, summary_line
from jaxtune.feature_heads import feature_only, feature_run
from jaxtune.loading import LABELS_FILE, build_model, check_labels, from_pretrained, load_tokenizer
from jaxtune.models import resolve_dtype
from jaxtune.models.heads import SequenceClassifier
from jaxtune.models.losses import label_loss_sums
from jaxtune.peft.trainable import classifier_filter
from jaxtune.train.task import Task, register

WEIGHTS_FILE = "class_weights.json"


def label_info(cfg, train_ds, run_dir: Path | None) -> dict:
    """``{"num_labels", "label_names"}`` of the run, checked against the labels saved in
    ``run_dir`` (None: a run started over); nothing is written.

    Raises:
      ConfigError: a resumed run whose data now has other labels than its checkpoint.
    """
    names = list(train_ds.label_names or [])
    k = cfg.peft.num_labels or len(names)
    if k < 2:
        raise ConfigError(f"data.train has {k} label(s); a classifier needs at least 2")
    info = {"num_labels": int(k), "label_names": names if len(names) == k else None}
    if run_dir is not None:
        check_labels(run_dir, info)
    return info


@register
class Classification(Task):
    """Cross-entropy over labels of a :class:`SequenceClassifier` (backbone + head)."""

    name = "classification"
    batch_ndims = {"input_ids": 2, "attention_mask": 2, "labels": 1}
    language_model = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.labels: dict | None = None
        self.weights: dict | None = None  # class_weights.json (data.balance: weight)

    def prepare(self, datasets, previous_run):
        # A run started over (previous_run None) is not held to the labels it deletes.
        train = datasets["train"]
        self.labels = label_info(self.cfg, train, previous_run)
        if self.cfg.data.balance == "weight":
            self.weights = class_weight_info(train.labels, train.label_names)
            _check_weights(previous_run, self.weights)
        if (line := balance_line(train.stats)) and jax.process_index() == 0:
            print(line)
        load_probe(self.cfg.eval.bias_probe)  # a bad probe file fails before any step

    def fit_without_steps(self) -> bool:
        return feature_only(self.cfg)

    def fit(self, run_dir, commit, t_start):
        return _fit_feature_head(self, Path(run_dir), commit, t_start)

    def build_model(self, mesh):
        return build_model(self.cfg, mesh, self.labels)

    def abstract_model(self, model_cfg):
        backbone = super().abstract_model(model_cfg)
        k = self.cfg.peft.num_labels or 2  # plan reads no data: num_labels, else binary
        p = self.cfg.peft
        return nnx.eval_shape(
            lambda: SequenceClassifier(
                backbone,
                k,
                pooling=p.pooling,
                feature_layer=p.feature_layer,
                head_hidden=p.head_hidden,
                rngs=nnx.Rngs(0),
            )
        )

    def trainable(self, model):
        return classifier_filter(model, self.cfg.peft)

    def loss_sums(self, model, batch, rng):
        w = None
        if self.weights is not None:
            # The step divides by max(weight sum, 1) (a padding-only batch must not
            # divide by 0). Scaled so the lightest class weighs 1, a batch with any
            # labelled row weighs >= 1 and that floor never bites; the mean loss and its
            # gradients do not depend on the scale.
            w = np.asarray(self.weights["class_weights"], np.float32)
            w = w / w[w > 0].min()
        return label_loss_sums(model, batch, rng, w)

    def evaluate(self, model, dataset, mesh) -> dict:
        t = self.cfg.train
        m = classifier_metrics(model, dataset, t.batch_size, t.max_eval_batches or None)
        m.pop("confusion")
        return m

    def run_files(self) -> dict[str, str]:
        files = {LABELS_FILE: json.dumps(self.labels, indent=2)}
        if self.weights is not None:
            files[WEIGHTS_FILE] = json.dumps(self.weights, indent=2)
        return files

    def finish(self, model, datasets, run_dir, step) -> dict:
        return final_classifier_report(self.cfg, model, datasets, run_dir, step)


def _check_weights(run_dir: Path | None, info: dict) -> None:
    """ConfigError if a resumed run's ``class_weights.json`` differs from ``info``."""
    path = Path(run_dir) / WEIGHTS_FILE if run_dir is not None else None
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved != info:
            raise ConfigError(
                f"{path}: the run was started with class weights {saved['class_weights']} "
                f"(class counts {saved['class_counts']}), the data now gives "
                f"{info['class_weights']} ({info['class_counts']}); use a new run.dir"
            )


def _markdown(result: dict, names: list[str] | None) -> str:
    k = len(result["confusion"])
    names = names or [str(i) for i in range(k)]
    lines = [
        f"# Classification report ({result['split']} split, {result['n']} examples)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {result['accuracy']:.4f} |",
        f"| macro-F1 | {result['macro_f1']:.4f} |",
        f"| majority-class baseline | {result['majority']:.4f} |",
        "",
        "Confusion matrix (rows = gold, columns = predicted):",
        "",
        "| gold \\ pred | " + " | ".join(names) + " |",
        "|---|" + "---|" * k,
    ]
    for name, row in zip(names, result["confusion"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(int(x)) for x in row) + " |")
    lines += ["", "Per class (support = gold examples):", ""]
    lines += per_class_markdown(per_class(result["confusion"]), names)
    return "\n".join(lines) + "\n"


def _write(run_dir: Path, result: dict, names) -> None:
    if jax.process_index() != 0:
        return
    atomic_file(run_dir / "classification_report.json", json.dumps(result, indent=2))
    md = _markdown(result, names) + report_section(result.get("bias_probe"))
    atomic_file(run_dir / "classification_report.md", md)


def bias_probe(cfg, clf) -> dict | None:
    """``eval.bias_probe`` run on the trained classifier: ``{"probe", "attributes"}``
    (None for ``none``); prints one summary line."""
    groups = load_probe(cfg.eval.bias_probe)
    if not groups:
        return None
    attrs = classifier_probe(
        clf,
        load_tokenizer(cfg.model.path),
        groups,
        batch_size=cfg.eval.batch_size,
        max_len=cfg.train.seq_len,
    )
    print(f"bias probe ({cfg.eval.bias_probe}): {summary_line(attrs)}")
    return {"probe": cfg.eval.bias_probe, "attributes": attrs}


def final_classifier_report(cfg, model, datasets, run_dir, step) -> dict:
    """Scores the trained classifier on ``test`` (else ``validation``); writes the report.

    Returns:
      ``{"<split>/accuracy", "<split>/macro_f1", "<split>/majority"}`` for the summary
      (empty if there is no held-out split).
    """
    split = "test" if "test" in datasets else "validation"
    if split not in datasets:
        return {}
    m = classifier_metrics(model, datasets[split], cfg.train.batch_size)
    train_labels = np.asarray(datasets["train"].labels)
    k = len(m["confusion"])
    majority = np.bincount(train_labels, minlength=k).argmax()
    gold_majority = float(np.asarray(m["confusion"])[majority].sum() / max(m["eval/n"], 1))
    result = {
        "split": split,
        "step": int(step),
        "accuracy": m["eval/accuracy"],
        "macro_f1": m["eval/macro_f1"],
        "n": m["eval/n"],
        "majority": gold_majority,
        "confusion": np.asarray(m["confusion"]).tolist(),
        **per_class(m["confusion"]),
        "bias_probe": bias_probe(cfg, model),
    }
    _write(Path(run_dir), result, datasets["train"].label_names)
    print(
        f"{split}: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f} "
        f"(majority class {gold_majority:.4f}); report: {run_dir}/classification_report.md"
    )
    return {f"{split}/{k}": result[k] for k in ("accuracy", "macro_f1", "majority")}


def _fit_feature_head(task: Classification, run_dir: Path, commit, t_start: float) -> dict:
    """``jaxtune train`` for ``peft.method: feature``: cached features + a fitted head.

    ``commit(run_files)`` creates the run directory (config + labels) once the data has
    been read and the head fitted, so a failure before leaves no trace.
    """
    cfg = task.cfg
    load_probe(cfg.eval.bias_probe)  # a bad probe file fails before anything is written
    feature = {"head_lr": cfg.optim.lr}
    if cfg.train.steps:
        feature["head_steps"] = int(cfg.train.steps)
    result = feature_run(cfg, feature=feature)
    head, task.labels = result.pop("_head"), result.pop("_labels")
    task.weights = result.pop("_class_weights")
    split = result["eval_split"]
    step = int(cfg.train.steps or 0)
    result.update(split=split, step=step)
    commit(task.run_files())
    _save_head(cfg, run_dir, head, step)
    # The run loads back as backbone + the saved head: the classifier users get.
    result["bias_probe"] = bias_probe(cfg, from_pretrained(run_dir, dtype=cfg.model.dtype))
    _write(run_dir, result, result.get("label_names"))
    summary = {
        "run_dir": str(run_dir),
        "steps": result.get("step", 0),
        "stop_reason": "completed",
        "final_loss": None,
        "eval": {f"{split}/{k}": result[k] for k in ("accuracy", "macro_f1", "majority")},
        "seconds": time.perf_counter() - t_start,
        "compiles": 0,
    }
    if jax.process_index() == 0:
        atomic_file(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    print(
        f"{split}: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f} "
        f"(majority class {result['majority']:.4f}); the classifier loads from {run_dir}"
    )
    return summary


class _HeadOnly(nnx.Module):
    """The fitted head under the name it has in a ``SequenceClassifier`` (``head``), so
    its checkpoint is the one an end-to-end run of the same config would write."""

    def __init__(self, head):
        self.head = head


def _save_head(cfg, run_dir: Path, head, step: int) -> None:
    """Checkpoints the fitted head as the run's trainable parameters (step ``step``).

    The backbone is frozen and unchanged, so this is the whole trained classifier:
    ``jaxtune.from_pretrained(run_dir)``, ``jaxtune eval`` and ``jaxtune export`` rebuild
    it from ``model.path`` + this checkpoint + ``labels.json``. Parameters take
    ``model.dtype``, as the classifier's head does.
    """

    dtype = resolve_dtype(cfg.model.dtype)
    params = jax.tree.map(lambda a: a.astype(dtype), nnx.state(_HeadOnly(head), nnx.Param))
    ckpt = Checkpointer(run_dir, keep=1, async_save=False)
    try:
        if ckpt.latest_step() == step:  # a finished run run again: same head, already saved
            return
        ckpt.save(step, params, None, {}, {"step": step, "method": "feature"})
    finally:
        ckpt.close()
