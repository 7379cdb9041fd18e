"""Classification runs in ``jaxtune train`` (``peft.head: classification``).

End-to-end methods (full, LoRA, DoRA, adapters, feature + unfrozen top layers) train a
:class:`~jaxtune.models.heads.SequenceClassifier` in the same loop as language models:
same sharded step (the loss is cross-entropy over the labels), checkpoints, exact
resume, validation, logging. This module holds what differs:

- :func:`label_info`: the label set, fixed when the run starts and kept in the run
  directory (``labels.json``, written by :func:`keep_labels` once the run's checks have
  passed), so a resumed run and ``jaxtune export`` rebuild the same head.
- :func:`final_classifier_report`: accuracy / macro-F1 / confusion matrix on the test
  split (else validation) -> ``classification_report.{json,md}``.
- :func:`run_feature_head`: ``peft.method: feature`` with nothing unfrozen has no
  backbone gradients at all; it runs :func:`jaxtune.classify.run` (features cached
  once, then a head fitted in seconds), writes the same report and checkpoints the
  head, so the run loads back as the trained classifier.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
from flax import nnx

from jaxtune.errors import ConfigError

LABELS_FILE = "labels.json"


def feature_only(cfg) -> bool:
    """``peft.method: feature`` with no backbone parameter unfrozen."""
    p = cfg.peft
    return p.method == "feature" and not p.unfreeze and not p.unfreeze_top_layers


def label_info(cfg, train_ds, run_dir: Path | None) -> dict:
    """``{"num_labels", "label_names"}`` of the run, checked against the labels saved in
    ``run_dir`` (None: a run started over); nothing is written (:func:`keep_labels`
    does, once the run starts).

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


def check_labels(run_dir: Path, info: dict) -> None:
    """ConfigError if the run dir holds a labels file with another label set."""
    path = Path(run_dir) / LABELS_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != info:
            raise ConfigError(
                f"{path}: the run was started with labels {saved}, the data now gives {info}; "
                "use a new run.dir"
            )


def keep_labels(run_dir: Path, info: dict) -> dict:
    """Writes ``info`` to the run's labels file, or checks it against the one there."""
    check_labels(run_dir, info)
    path = Path(run_dir) / LABELS_FILE
    if not path.exists() and jax.process_index() == 0:
        path.write_text(json.dumps(info, indent=2))
    return info


def saved_labels(run_dir: Path) -> dict:
    """The label set a classification run was trained with (for loading it back)."""
    path = Path(run_dir) / LABELS_FILE
    if not path.exists():
        raise ConfigError(f"{path}: missing; is {run_dir} a classification run?")
    return json.loads(path.read_text())


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
    return "\n".join(lines) + "\n"


def _write(run_dir: Path, result: dict, names) -> None:
    if jax.process_index() != 0:
        return
    for name, text in (
        ("classification_report.json", json.dumps(result, indent=2)),
        ("classification_report.md", _markdown(result, names)),
    ):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(run_dir / name)


def final_classifier_report(cfg, graphdef, params, frozen, datasets, run_dir, step) -> dict:
    """Scores the trained classifier on ``test`` (else ``validation``); writes the report.

    Returns:
      ``{"<split>/accuracy", "<split>/macro_f1", "<split>/majority"}`` for the summary
      (empty if there is no held-out split).
    """
    import numpy as np

    from jaxtune.train.evals import classifier_metrics

    split = "test" if "test" in datasets else "validation"
    if split not in datasets:
        return {}
    m = classifier_metrics(graphdef, params, frozen, datasets[split], cfg.train.batch_size)
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
    }
    _write(Path(run_dir), result, datasets["train"].label_names)
    print(
        f"{split}: accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f} "
        f"(majority class {gold_majority:.4f}); report: {run_dir}/classification_report.md"
    )
    return {f"{split}/{k}": result[k] for k in ("accuracy", "macro_f1", "majority")}


def run_feature_head(cfg, run_dir: Path, t_start: float, commit=None) -> dict:
    """``jaxtune train`` for ``peft.method: feature``: cached features + a fitted head.

    ``commit(labels)`` checks the labels against the run's and creates the run directory
    (config + labels) once the data has been read and the head fitted, so a failure
    before leaves no trace; None = the directory exists already (only the labels are
    written).
    """
    from jaxtune.classify import run

    feature = {"head_lr": cfg.optim.lr}
    if cfg.train.steps:
        feature["head_steps"] = int(cfg.train.steps)
    result = run(cfg, feature=feature)
    head, labels = result.pop("_head"), result.pop("_labels")
    split = result["eval_split"]
    step = int(cfg.train.steps or 0)
    result.update(split=split, step=step)
    if commit is not None:
        commit(labels)
    else:
        keep_labels(run_dir, labels)
    _save_head(cfg, Path(run_dir), head, step)
    _write(Path(run_dir), result, None)
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
        (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
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
    from jaxtune.api import resolve_dtype
    from jaxtune.checkpoint import Checkpointer

    dtype = resolve_dtype(cfg.model.dtype)
    params = jax.tree.map(lambda a: a.astype(dtype), nnx.state(_HeadOnly(head), nnx.Param))
    ckpt = Checkpointer(run_dir, keep=1, async_save=False)
    try:
        if ckpt.latest_step() == step:  # a finished run run again: same head, already saved
            return
        ckpt.save(step, params, None, {}, {"step": step, "method": "feature"})
    finally:
        ckpt.close()
