"""Orbax checkpoints of a training run: exact resume, keep-N / best, adapters-only.

A step directory holds four items:

- ``params``: the *trainable* partition only (LoRA / adapters for PEFT runs; every
  weight for full fine-tuning). Frozen base weights are re-read from ``model.path``.
- ``opt_state``: the optimizer state (trainable leaves only, by construction).
- ``data``: the data iterator position (epoch, step), so no batch is replayed or skipped.
- ``meta``: step, seed, metrics.

Arrays are stored under stable names derived from their pytree paths, and restored
straight into the shardings of the live state, so a run saved on 8 devices restores
on 1. Orbax finalises a step by an atomic rename: a save interrupted midway is never
seen as the latest step.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxtune.errors import ModelLoadError


def _name(path) -> str:
    s = jax.tree_util.keystr(path)
    return re.sub(r"[^A-Za-z0-9_]+", ".", s).strip(".") or "root"


def to_named(tree) -> dict[str, jax.Array]:
    """Flattens a pytree to ``{stable name: leaf}``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {_name(p): x for p, x in leaves}
    if len(out) != len(leaves):
        raise ValueError("pytree paths collide after sanitising")
    return out


def from_named(named: dict, like):
    """Inverse of :func:`to_named` given a pytree ``like`` with the same structure."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [named[_name(p)] for p, _ in paths])


def abstract_named(tree) -> dict[str, jax.ShapeDtypeStruct]:
    """Restore targets (shape, dtype, sharding) for the live arrays of ``tree``."""
    return {
        k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        for k, x in to_named(tree).items()
    }


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for ``run_dir/checkpoints``."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        keep: int = 3,
        keep_best: bool = False,
        best_metric: str = "eval/loss",
        best_mode: str = "min",
        async_save: bool = True,
    ):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        best_fn = None
        if keep_best:
            best_fn = lambda m: float(
                m.get(best_metric, float("inf") if best_mode == "min" else float("-inf"))
            )  # noqa: E731
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            best_fn=best_fn,
            best_mode=best_mode,
            keep_checkpoints_without_metrics=False if keep_best else True,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("params", "opt_state", "data", "meta"), options=options
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        params,
        opt_state,
        data_state: dict,
        meta: dict,
        metrics: dict | None = None,
    ):
        """Saves (asynchronously when enabled) everything needed to resume at ``step``.

        ``opt_state=None``: parameters without an optimizer (a head fitted on cached
        features); such a checkpoint loads for inference but cannot resume training.
        """
        items = dict(
            params=ocp.args.StandardSave(to_named(params)),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(to_named(opt_state))
        self.manager.save(
            step, args=ocp.args.Composite(**items), metrics=metrics or None, force=True
        )

    def restore(self, step: int, params_like, opt_state_like=None):
        """(params, opt_state or None, data_state, meta) restored into the live shardings."""
        items = {
            "params": ocp.args.StandardRestore(abstract_named(params_like)),
            "data": ocp.args.JsonRestore(),
            "meta": ocp.args.JsonRestore(),
        }
        if opt_state_like is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_named(opt_state_like))
        try:
            r = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types for missing / mismatched items
            hint = ""
            if "tree structures do not match" in str(e) or "shape" in str(e).lower():
                hint = (
                    "; the trainable parameters differ from the checkpoint's: was peft.* or "
                    "the model changed since it was written? Use another run.dir or "
                    "train.overwrite=true"
                )
            raise ModelLoadError(
                f"{self.directory}/{step}: cannot restore checkpoint ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]}){hint}"
            ) from None
        params = from_named(r["params"], params_like)
        opt_state = (
            from_named(r["opt_state"], opt_state_like) if opt_state_like is not None else None
        )
        return params, opt_state, r["data"], r["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def run_model_source(run_dir: Path) -> str:
    """The base model path recorded in a run's resolved config."""
    from jaxtune.config import load_config

    return load_config(Path(run_dir) / "config.yaml").model.path


def load_run_model(run_dir: Path, dtype=None, step: int | None = None, **opts):
    """Base model + PEFT modules + the trainable weights of a run's latest checkpoint.

    Returns the model with adapters unmerged (``save_pretrained`` merges them).
    """
    from flax import nnx

    from jaxtune.api import from_pretrained
    from jaxtune.config import load_config
    from jaxtune.peft.trainable import apply_peft, trainable_filter

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.peft.head == "classification":  # a SequenceClassifier: backbone + head
        import dataclasses

        from jaxtune.classify import build_classifier
        from jaxtune.models.heads import classifier_filter
        from jaxtune.train.classification import saved_labels

        labels = saved_labels(run_dir)
        names = labels["label_names"]
        model_cfg = dataclasses.replace(cfg.model, dtype=dtype or cfg.model.dtype)
        model = build_classifier(
            dataclasses.replace(cfg, model=model_cfg),
            labels["num_labels"],
            tuple(names) if names else None,
        )
        filt = classifier_filter(model, cfg.peft)
    else:
        # The base as the run trained on it: a QLoRA run's adapters belong on the
        # quantized kernels (exports dequantize them, so merged weights hold exactly
        # what the trained model computed).
        opts.setdefault("quantize", cfg.model.quantize)
        model = from_pretrained(
            cfg.model.path, dtype=dtype or cfg.model.dtype, scan_layers=scan_layers_for(cfg), **opts
        )
        apply_peft(model, cfg.peft, rngs=nnx.Rngs(cfg.train.seed))
        filt = trainable_filter(model, cfg.peft)
    ckpt = Checkpointer(run_dir, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise ModelLoadError(f"{run_dir}: the run has no checkpoint yet")
    _, params, _ = nnx.split(model, filt, ...)
    params, _, _, _ = ckpt.restore(step, params)
    nnx.update(model, params)
    ckpt.close()
    model.source = str(cfg.model.path)
    return model


def scan_layers_for(cfg) -> bool:
    """Top-N-layer unfreezing needs one array per layer, so it disables scanning."""
    return bool(cfg.model.scan_layers and not cfg.peft.unfreeze_top_layers)
