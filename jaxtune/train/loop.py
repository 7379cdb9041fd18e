"""The host training loop: data, steps, evaluation, logging, checkpoints, preemption.

``train(cfg)`` is what ``jaxtune train`` runs. Re-running it with the same ``run.dir``
resumes from the latest complete checkpoint: step, trainable params, optimizer state and
data position are restored, and per-step randomness is a function of (seed, step), so
the resumed run reproduces the uninterrupted one bit for bit.

Failure modes it handles:

- SIGTERM / SIGINT (preemption, Ctrl-C): finish the current step, save, exit 0. On
  several hosts the stop is agreed on collectively, so every host saves the same step.
- SIGKILL / power loss: Orbax finalises a checkpoint by an atomic rename, so the next
  run resumes from the last *complete* checkpoint.
- A non-finite loss, gradient or weight: stop before saving anything from that step
  (every checkpoint on disk is usable) and name the last good checkpoint.
- A start that fails (bad data, model or seq_len, a resume whose saved settings differ,
  a run.dir that is not jaxtune's): nothing is written; run.dir is left as it was
  (:mod:`jaxtune.train.run_dir`: what jaxtune owns, what overwrite may delete).
- A full disk: one line naming the checkpoint being written; its temporary directory
  is removed and the earlier checkpoints stay usable.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.checkpoint import Checkpointer, scan_layers_for
from jaxtune.config import Config, save_config, validate_against_devices
from jaxtune.errors import ConfigError, TrainingError
from jaxtune.sharding import batch_sharding, make_mesh, state_shardings, variable_sharding
from jaxtune.train.classification import check_labels, keep_labels
from jaxtune.train.logger import MetricsLogger
from jaxtune.train.preflight import check_positions
from jaxtune.train.run_dir import check_resume, plan_start, writing
from jaxtune.train.state import init_opt_state, jit_train_step, make_state, train_state_shardings
from jaxtune.train.step import make_eval_step, stack_micro_batches


def _sync(name: str) -> None:
    """Barrier across hosts (no-op on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _commit(plan, cfg: Config, labels: dict | None = None) -> None:
    """Process 0 clears (overwrite) / creates the run dir, its marker and config.yaml
    (and a classifier's labels.json)."""
    if labels is not None and plan.mode != "overwrite":
        check_labels(plan.path, labels)
    _sync("jaxtune_run_dir_checked")
    if jax.process_index() == 0:

        def write(path: Path) -> None:
            save_config(cfg, path)
            if labels is not None:
                keep_labels(plan.path, labels)

        plan.commit(write)
    _sync("jaxtune_run_dir_cleared")


def device_batch(batch: dict, mesh, leading: int = 0, labels: bool = False) -> dict:
    """Host-local numpy batch -> global jax arrays sharded over (data, fsdp).

    Each host passes only its own rows; ``make_array_from_process_local_data``
    assembles the global batch without any host seeing the others' data. ``labels``
    (int [B], classification) are kept only when asked for.
    """
    out = {}
    for k, v in batch.items():
        if k == "labels" and not labels:
            continue
        sharding = batch_sharding(mesh, v.ndim, leading)
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


class _Preempt:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                break
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
        self.signal = signal.Signals(signum).name

    def agreed(self) -> str | None:
        """The signal if *any* host got one: hosts must stop at the same step, or the
        ones that go on would wait forever in the next step's collectives."""
        if jax.process_count() == 1:
            return self.signal
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
        if self.signal is None and np.any(flags):
            self.signal = "SIGTERM (on another host)"
        return self.signal

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def build_model(cfg: Config, mesh, labels: dict | None = None):
    """Base model loaded into its shards, plus PEFT modules, placed on the mesh.

    With ``peft.head: classification`` the model is a
    :class:`~jaxtune.models.heads.SequenceClassifier` over the backbone; ``labels`` is
    then ``{"num_labels": K, "label_names": [...]}``.
    """
    from jaxtune.api import from_pretrained
    from jaxtune.peft.trainable import apply_peft
    from jaxtune.sharding import shard_model

    if not cfg.model.path:
        raise ConfigError(
            "model.path is required (an HF dir, a .gguf file or a jaxtune checkpoint)"
        )
    if cfg.peft.head == "classification":
        from jaxtune.classify import build_classifier

        names = labels.get("label_names")
        clf = build_classifier(cfg, labels["num_labels"], tuple(names) if names else None)
        return shard_model(clf, mesh)
    model = from_pretrained(
        cfg.model.path,
        dtype=cfg.model.dtype,
        scan_layers=scan_layers_for(cfg),
        remat=cfg.model.remat,
        attention_impl=cfg.model.attention,
        mlp_chunks=cfg.model.mlp_chunks,
        sharding=variable_sharding(mesh),
        quantize=cfg.model.quantize,
    )
    if cfg.model.compute_dtype:
        model.compute_dtype = jnp.dtype(cfg.model.compute_dtype)
    apply_peft(model, cfg.peft, rngs=nnx.Rngs(cfg.train.seed))
    return shard_model(model, mesh)


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: ``train.steps``, or ``train.epochs`` worth of batches."""
    if cfg.train.steps:
        return int(cfg.train.steps)
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch / cfg.train.grad_accum))


def evaluate_loss(eval_fn, params, frozen, dataset, cfg: Config, mesh) -> dict:
    """Token-weighted validation loss and perplexity over (up to max_eval_batches) batches."""
    from jaxtune.data import BatchIterator

    it = BatchIterator(
        dataset,
        cfg.train.batch_size,
        seed=0,
        shuffle=False,
        drop_remainder=False,
        num_epochs=1,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    total, weight = 0.0, 0.0
    for i, batch in enumerate(it):
        if cfg.train.max_eval_batches and i >= cfg.train.max_eval_batches:
            break
        s, w = eval_fn(params, frozen, device_batch(batch, mesh))
        total += float(s)
        weight += float(w)
    loss = total / max(weight, 1.0)
    return {
        "eval/loss": loss,
        "eval/perplexity": float(math.exp(min(loss, 50.0))),
        "eval/tokens": weight,
    }


def _nonfinite_message(row: dict, last_saved: int | None, ckpt: Checkpointer) -> str:
    where = (
        f"the last good checkpoint is step {last_saved} ({ckpt.directory / str(last_saved)})"
        if last_saved
        else "no checkpoint was saved"
    )
    return (
        f"loss, gradients or weights became non-finite at step {row['step']} (loss "
        f"{row['loss']}, grad norm {row['grad_norm']}); stopped without saving it, {where}. "
        "Lower optim.lr, keep optim.grad_clip, or check the data"
    )


def train(cfg: Config, *, stop_after: int | None = None) -> dict:
    """Runs (or resumes) a fine-tuning run; returns a summary dict.

    ``stop_after`` ends this invocation after that global step with a checkpoint, as a
    preemption would (time-boxed jobs; resume tests). The schedule still spans all steps.

    Returns:
      ``{"run_dir", "steps", "stop_reason", "final_loss", "eval", "seconds",
      "compiles"}``; ``compiles`` counts compilations of the train step (one per
      distinct batch shape; fixed ``data.length_buckets`` keep it at one).

    Raises:
      ConfigError: the mesh or batch does not fit the devices, ``train.seq_len`` exceeds
        the model's positions, the run dir is not jaxtune's (or is a file, or read-only),
        or a resumed run's saved settings differ (see :mod:`jaxtune.train.run_dir`).
      DataError / ModelLoadError: bad data or model; run.dir is left as it was.
      TrainingError: the loss, gradients or weights became non-finite.
      DiskFullError: the disk filled up (a checkpoint's temporary directory is removed).
    """
    # From the start: a signal during setup exits cleanly too.
    with _Preempt() as pre, writing(cfg.run.dir):
        return _train(cfg, pre, stop_after)


def _train(cfg: Config, pre: _Preempt, stop_after: int | None) -> dict:
    from jaxtune.api import load_tokenizer
    from jaxtune.data import BatchIterator, build_datasets
    from jaxtune.models.heads import classifier_filter
    from jaxtune.optim import build_optimizer, lr_schedule
    from jaxtune.peft.trainable import summary, trainable_filter
    from jaxtune.train.classification import (
        feature_only,
        final_classifier_report,
        label_info,
        run_feature_head,
    )
    from jaxtune.train.evals import TaskEvals, classifier_metrics, improved
    from jaxtune.train.step import loss_sums_for

    t_start = time.perf_counter()
    data_n, fsdp_n, tensor_n = validate_against_devices(
        cfg, jax.device_count(), jax.process_count()
    )
    if (data_n * fsdp_n) % jax.process_count():
        # Each host loads distinct rows, so its devices must hold distinct batch shards:
        # only the batch axes (data, fsdp) may span hosts, not tensor.
        raise ConfigError(
            f"mesh data x fsdp = {data_n * fsdp_n} must be a multiple of the "
            f"{jax.process_count()} processes (mesh.tensor must fit within one host)"
        )
    mesh = make_mesh(data_n, fsdp_n, tensor_n)
    # Everything a user can get wrong is checked before run.dir is touched (the
    # directory, the saved settings of a resumed run, the model's positions, the data,
    # the model, eval tasks, the checkpoint to restore): a start that fails leaves
    # run.dir exactly as it was. ``_commit`` then creates / clears it and writes.
    plan = plan_start(cfg)
    check_positions(cfg)
    check_resume(plan, cfg)
    run_dir = plan.path

    is_cls = cfg.peft.head == "classification"
    if is_cls and feature_only(cfg):
        return run_feature_head(
            cfg, run_dir, t_start, commit=lambda labels: _commit(plan, cfg, labels)
        )
    tokenizer = load_tokenizer(cfg.model.path)
    datasets = build_datasets(cfg.data, tokenizer, cfg.train.seq_len)
    if "train" not in datasets:
        raise ConfigError("data.train is required")
    if is_cls:  # a run started over is not held to the labels it deletes
        labels = label_info(cfg, datasets["train"], None if plan.mode == "overwrite" else run_dir)
    else:
        labels = None
    model = build_model(cfg, mesh, labels)
    filt = classifier_filter(model, cfg.peft) if is_cls else trainable_filter(model, cfg.peft)
    info = summary(model, filt)
    graphdef, params, frozen = nnx.split(model, filt, ...)
    loss_sums = loss_sums_for(model, cfg.model.loss_chunk)
    del model

    it = BatchIterator(
        datasets["train"],
        cfg.train.batch_size,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    n_steps = total_steps(cfg, it.steps_per_epoch)
    tx = build_optimizer(cfg.optim, n_steps, params)
    schedule = lr_schedule(cfg.optim, n_steps)
    opt_state = init_opt_state(tx, params, mesh)
    tasks = TaskEvals(cfg, tokenizer, datasets, graphdef, run_dir, n_steps)

    def checkpointer() -> Checkpointer:
        return Checkpointer(
            run_dir,
            keep=cfg.checkpoint.keep,
            keep_best=cfg.checkpoint.keep_best,
            best_metric=cfg.checkpoint.best_metric,
            best_mode=cfg.checkpoint.best_mode,
            async_save=cfg.checkpoint.async_save,
        )

    ckpt, logger = None, None
    try:
        start_step = 0
        # Early stopping's memory travels in the checkpoint, so a resumed run stops
        # exactly where the uninterrupted one would.
        watch = {"best": None, "bad_evals": 0, "last_eval": None}
        if plan.resume:
            ckpt = checkpointer()  # reads the existing checkpoints/; writes nothing
            if ckpt.latest_step() is not None:
                start_step = ckpt.latest_step()
                # Restored straight into the live shardings: a run saved on another mesh
                # or device count resumes here unchanged.
                params, opt_state, data_state, meta = ckpt.restore(start_step, params, opt_state)
                it.restore(data_state)
                watch.update(meta.get("watch", {}))
        _commit(plan, cfg, labels)
        if ckpt is None:
            ckpt = checkpointer()
        if jax.process_index() == 0:
            print(info["text"])
            if start_step:
                print(f"resumed {run_dir} at step {start_step}")
        state = make_state(start_step, params, opt_state, cfg.train.seed, mesh)
        del params, opt_state
        step_fn = jit_train_step(
            graphdef,
            tx,
            train_state_shardings(state["params"], state["opt_state"], mesh),
            state_shardings(frozen, mesh),
            mesh,
            grad_accum=cfg.train.grad_accum,
            dropout=cfg.peft.dropout > 0,
            loss_sums=loss_sums,
            batch_ndims={k: (1 if k == "labels" else 2) for k in _CLS_KEYS} if is_cls else None,
        )
        eval_fn = jax.jit(make_eval_step(graphdef, loss_chunk=cfg.model.loss_chunk))
        val = datasets.get("validation")

        def evaluate(params) -> dict:
            if not is_cls:
                return evaluate_loss(eval_fn, params, frozen, val, cfg, mesh)
            m = classifier_metrics(
                graphdef, params, frozen, val, cfg.train.batch_size, cfg.train.max_eval_batches
            )
            m.pop("confusion")
            return m

        logger = MetricsLogger(
            run_dir, cfg, n_steps, start_step, params=info, devices=list(mesh.devices.flat)
        )
        saved = {"step": start_step if start_step else None}

        def save(step_no: int, metrics: dict) -> None:
            # Orbax copies the arrays to host memory before ``save`` returns (on CPU it
            # holds the buffers, and XLA then declines to donate them), so the next step
            # donating ``state`` can never change what is being written.
            if saved["step"] != step_no:
                meta = {"step": step_no, "watch": dict(watch)}  # a copy: saves may be async
                ckpt.save(step_no, state["params"], state["opt_state"], it.state(), meta, metrics)
                saved["step"] = step_no

        nonfinite = None
        stop_reason = "completed"
        lead = 0 if cfg.train.grad_accum == 1 else 1
        watched = cfg.train.early_stopping_metric
        if tasks.due(start_step) and start_step == 0:
            tasks.run(0, state["params"], frozen)  # the "before" column of the report
        for step in range(start_step, n_steps):
            if pre.agreed():
                stop_reason = f"stopped by {pre.signal}"
                break
            micro = [next(it) for _ in range(cfg.train.grad_accum)]
            if is_cls:
                micro = [{k: b[k] for k in _CLS_KEYS} for b in micro]
            batch = micro[0] if cfg.train.grad_accum == 1 else stack_micro_batches(micro)
            t0 = time.perf_counter()
            state, metrics = step_fn(state, frozen, device_batch(batch, mesh, lead, labels=is_cls))
            metrics = jax.device_get(metrics)  # one host sync per step, all scalars at once
            row = {
                "step": step + 1,
                "loss": float(metrics["loss"]),
                "lr": float(schedule(step)),
                "grad_norm": float(metrics["grad_norm"]),
                "tokens": float(metrics["tokens"]),
                "seq_tokens": int(batch["attention_mask"].sum()) * jax.process_count(),
                "step_time": time.perf_counter() - t0,
                "epoch": it.epoch,
            }
            if not bool(metrics["finite"]):
                nonfinite = _nonfinite_message(row, saved["step"], ckpt)
                break
            do_eval = (
                val is not None and cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0
            )
            evaluated = False
            if do_eval or (val is not None and step + 1 == n_steps):
                ev = evaluate(state["params"])
                row.update(ev)
                evaluated = True
                last_eval = watch["last_eval"]
                if (
                    last_eval is not None
                    and ev["eval/loss"] > last_eval[0]
                    and row["loss"] < last_eval[1]
                ):
                    logger.warn(
                        f"validation loss rose ({last_eval[0]:.4f} -> {ev['eval/loss']:.4f}) while "
                        "training loss fell: the model may be overfitting"
                    )
                watch["last_eval"] = [float(ev["eval/loss"]), row["loss"]]
            if tasks.due(step + 1):
                row.update(tasks.run(step + 1, state["params"], frozen))
                evaluated = True
            metric = row.get(watched) if evaluated else None
            if metric is not None:
                if improved(watched, metric, watch["best"]):
                    watch.update(best=float(metric), bad_evals=0)
                else:
                    watch["bad_evals"] += 1
            logger.log(row)
            every = cfg.checkpoint.every
            if every and (step + 1) % every == 0:
                save(step + 1, _ev(row))
            if stop_after is not None and step + 1 >= stop_after and step + 1 < n_steps:
                stop_reason = f"stopped after step {step + 1}"
                break
            patience = cfg.train.early_stopping_patience
            if patience and watch["bad_evals"] >= patience:
                stop_reason = f"early stopping: {cfg.train.early_stopping_metric} did not improve"
                break
        final_step = int(jax.device_get(state["step"]))
        if nonfinite is None:
            save(final_step, _ev(logger.last))
        ckpt.close()
        logger.close(stop_reason)
        if nonfinite:
            raise TrainingError(nonfinite)
        report = tasks.write_report(final_step) if tasks else None
        if report is not None:
            print(f"evaluation report: {report['md']}")
        final_eval = {k: v for k, v in logger.last.items() if k.startswith(("eval/", "tasks/"))}
        if is_cls:
            final_eval.update(
                final_classifier_report(
                    cfg, graphdef, state["params"], frozen, datasets, run_dir, final_step
                )
            )
        summary_out = {
            "run_dir": str(run_dir),
            "steps": final_step,
            "stop_reason": stop_reason,
            "final_loss": logger.last.get("loss"),
            "eval": final_eval,
            "seconds": time.perf_counter() - t_start,
            "compiles": step_fn._cache_size(),
        }
        if jax.process_index() == 0:
            (run_dir / "summary.json").write_text(json.dumps(summary_out, indent=2))
        return summary_out
    finally:
        # On an error path: stop Orbax's threads (no "Event loop is closed" noise) and
        # close the metrics file; both are no-ops after a clean finish.
        if ckpt is not None:
            ckpt.close(quiet=True)
        if logger is not None:
            logger.abort()


def _ev(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith(("eval/", "tasks/"))}


# The keys a classifier's batch needs (the iterator also yields LM targets).
_CLS_KEYS = ("input_ids", "attention_mask", "labels")
