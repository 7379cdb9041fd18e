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
import numpy as np
from flax import nnx

from jaxtune.atomic import atomic_file
from jaxtune.checkpoint import Checkpointer
from jaxtune.config import Config, save_config, validate_against_devices
from jaxtune.data import BatchIterator, build_datasets
from jaxtune.data.report import data_summary
from jaxtune.errors import ConfigError, TrainingError
from jaxtune.loading import load_tokenizer
from jaxtune.optim import lr_schedule
from jaxtune.sharding import device_batch, make_mesh
from jaxtune.train.evals import TaskEvals, improved
from jaxtune.train.logger import MetricsLogger
from jaxtune.train.preflight import check_positions
from jaxtune.train.report import write_run_report
from jaxtune.train.retention import Retention
from jaxtune.train.run_dir import check_resume, plan_start, writing
from jaxtune.train.samples import Samples
from jaxtune.train.state import make_state, setup_step
from jaxtune.train.step import stack_micro_batches
from jaxtune.train.tasks import task_for


def _sync(name: str) -> None:
    """Barrier across hosts (no-op on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _commit(plan, cfg: Config, run_files: dict[str, str]) -> None:
    """Process 0 clears (overwrite) / creates the run dir, its marker and config.yaml,
    and writes the task's run files (e.g. a classifier's ``labels.json``; one already
    there was checked against them by ``Task.prepare``)."""
    _sync("jaxtune_run_dir_checked")
    if jax.process_index() == 0:

        def write(config_path: Path) -> None:
            save_config(cfg, config_path)
            for name, text in run_files.items():
                if not (plan.path / name).exists():
                    atomic_file(plan.path / name, text)

        plan.commit(write)
    _sync("jaxtune_run_dir_cleared")


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


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: ``train.steps``, or ``train.epochs`` worth of batches."""
    if cfg.train.steps:
        return int(cfg.train.steps)
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch / cfg.train.grad_accum))


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


def train(cfg: Config, *, stop_after: int | None = None, init_model=None) -> dict:
    """Runs (or resumes) a fine-tuning run of the config's task; returns a summary dict.

    ``stop_after`` ends this invocation after that global step with a checkpoint, as a
    preemption would (time-boxed jobs; resume tests). The schedule still spans all steps.
    ``init_model(model)``: called once on the freshly built model before training (e.g.
    a classifier head fitted on cached features, LP-FT); a resumed run restores its
    trained parameters over it.

    Returns:
      ``{"run_dir", "steps", "stop_reason", "final_loss", "eval", "seconds",
      "compiles", "params"}``; ``compiles`` counts compilations of the train step (one per
      distinct batch shape; fixed ``data.length_buckets`` keep it at one); ``params`` is
      ``{"trainable", "total"}`` parameter counts.

    Raises:
      ConfigError: the mesh or batch does not fit the devices, ``train.seq_len`` exceeds
        the model's positions, the run dir is not jaxtune's (or is a file, or read-only),
        a resumed run's saved settings differ (see :mod:`jaxtune.train.run_dir`), or
        ``train.objective`` names no registered task.
      DataError / ModelLoadError: bad data or model; run.dir is left as it was.
      TrainingError: the loss, gradients or weights became non-finite.
      DiskFullError: the disk filled up (a checkpoint's temporary directory is removed).
    """
    # From the start: a signal during setup exits cleanly too.
    with _Preempt() as pre, writing(cfg.run.dir):
        return _train(cfg, pre, stop_after, init_model)


def _mesh(cfg: Config):
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
    return make_mesh(data_n, fsdp_n, tensor_n)


def _checkpointer(cfg: Config, run_dir: Path) -> Checkpointer:
    c = cfg.checkpoint
    return Checkpointer(
        run_dir,
        keep=c.keep,
        keep_best=c.keep_best,
        best_metric=c.best_metric,
        best_mode=c.best_mode,
        async_save=c.async_save,
    )


def _train(cfg: Config, pre: _Preempt, stop_after: int | None, init_model) -> dict:
    t_start = time.perf_counter()
    mesh = _mesh(cfg)
    # Everything a user can get wrong is checked before run.dir is touched (the
    # directory, the saved settings of a resumed run, the model's positions, the task,
    # the data, the model, eval tasks, the checkpoint to restore): a start that fails
    # leaves run.dir exactly as it was. ``_commit`` then creates / clears it and writes.
    plan = plan_start(cfg)
    check_positions(cfg)
    check_resume(plan, cfg)
    run_dir = plan.path
    task = task_for(cfg)

    def commit(run_files: dict[str, str]) -> None:
        _commit(plan, cfg, run_files)

    if task.fit_without_steps():
        return task.fit(run_dir, commit, t_start)
    tokenizer = load_tokenizer(cfg.model.path)
    datasets = build_datasets(cfg.data, tokenizer, cfg.train.seq_len)
    if "train" not in datasets:
        raise ConfigError("data.train is required")
    task.prepare(datasets, None if plan.mode == "overwrite" else run_dir)
    model = task.build_model(mesh)
    if init_model is not None:
        init_model(model)
    it = BatchIterator(
        datasets["train"],
        cfg.train.batch_size,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    n_steps = total_steps(cfg, it.steps_per_epoch)
    setup = setup_step(task, model, mesh, n_steps)
    del model
    graphdef, frozen = setup.graphdef, setup.frozen
    schedule = lr_schedule(cfg.optim, n_steps)
    evals = TaskEvals(cfg, tokenizer, datasets, graphdef, run_dir, n_steps)
    lm = task.language_model
    retention = Retention(
        cfg, tokenizer, graphdef, run_dir, language_model=lm, mesh_shape=dict(mesh.shape)
    )
    samples = Samples(cfg, tokenizer, datasets, graphdef, run_dir, language_model=lm)
    ckpt, logger = None, None
    try:
        start_step, params, opt_state = 0, setup.params, setup.opt_state
        # Early stopping's memory travels in the checkpoint, so a resumed run stops
        # exactly where the uninterrupted one would.
        watch = {"best": None, "bad_evals": 0, "last_eval": None}
        if plan.resume:
            ckpt = _checkpointer(cfg, run_dir)  # reads the existing checkpoints/; writes nothing
            if ckpt.latest_step() is not None:
                start_step = ckpt.latest_step()
                # Restored straight into the live shardings: a run saved on another mesh
                # or device count resumes here unchanged.
                params, opt_state, data_state, meta = ckpt.restore(start_step, params, opt_state)
                it.restore(data_state)
                watch.update(meta.get("watch", {}))
        commit(task.run_files())
        if ckpt is None:
            ckpt = _checkpointer(cfg, run_dir)
        if jax.process_index() == 0:
            print(setup.info["text"])
            if start_step:
                print(f"resumed {run_dir} at step {start_step}")
        state = make_state(start_step, params, opt_state, cfg.train.seed, mesh)
        step_fn, info = setup.step_fn, setup.info
        del params, opt_state, setup
        val = datasets.get("validation")

        def model_of(params) -> nnx.Module:
            return nnx.merge(graphdef, params, frozen)

        if start_step == 0:  # the "before" columns of the report: the base model
            if evals.due(0):
                evals.run(0, state["params"], frozen)
            retention.before(state["params"], frozen)
            samples.run("before", state["params"], frozen)
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
        for step in range(start_step, n_steps):
            if pre.agreed():
                stop_reason = f"stopped by {pre.signal}"
                break
            micro = [task.batch(next(it)) for _ in range(cfg.train.grad_accum)]
            batch = micro[0] if cfg.train.grad_accum == 1 else stack_micro_batches(micro)
            t0 = time.perf_counter()
            state, metrics = step_fn(state, frozen, device_batch(batch, mesh, lead))
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
            # The task's own metrics (e.g. preference rewards), averaged like the loss.
            row.update({k: float(v) for k, v in metrics["task"].items()})
            if not bool(metrics["finite"]):
                nonfinite = _nonfinite_message(row, saved["step"], ckpt)
                break
            do_eval = (
                val is not None and cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0
            )
            evaluated = False
            if do_eval or (val is not None and step + 1 == n_steps):
                ev = task.evaluate(model_of(state["params"]), val, mesh)
                row.update(ev)
                evaluated = True
                _watch_overfitting(watch, ev, row, logger)
            if evals.due(step + 1):
                row.update(evals.run(step + 1, state["params"], frozen))
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
        report = evals.write_report(final_step) if evals else None
        if report is not None:
            print(f"evaluation report: {report['md']}")
        final_eval = {k: v for k, v in logger.last.items() if k.startswith(("eval/", "tasks/"))}
        if stop_reason == "completed" or stop_reason.startswith("early stopping"):
            # A stopped run has more steps to go: it is scored when it finishes.
            final_eval.update(retention.after(final_step, state["params"], frozen))
            samples.run("after", state["params"], frozen)
        final_eval.update(task.finish(model_of(state["params"]), datasets, run_dir, final_step))
        summary_out = {
            "run_dir": str(run_dir),
            "steps": final_step,
            "stop_reason": stop_reason,
            "final_loss": logger.last.get("loss"),
            "eval": final_eval,
            "seconds": time.perf_counter() - t_start,
            "compiles": step_fn._cache_size(),
            "params": {k: info.get(k) for k in ("trainable", "total")},
        }
        if jax.process_index() == 0:
            data = data_summary(
                cfg.data,
                datasets,
                tokenizer,
                cfg.train.seq_len,
                cfg.train.batch_size,
                cfg.train.seed,
            )
            for s in data["splits"].values():
                s.pop("rendered", None)  # examples: `jaxtune data inspect` shows them
            atomic_file(
                run_dir / "summary.json", json.dumps({**summary_out, "data": data}, indent=2)
            )
            print(f"run report: {write_run_report(run_dir)}")
        return summary_out
    finally:
        # On an error path: stop Orbax's threads (no "Event loop is closed" noise) and
        # close the metrics file; both are no-ops after a clean finish.
        if ckpt is not None:
            ckpt.close(quiet=True)
        if logger is not None:
            logger.abort()


def _watch_overfitting(watch: dict, ev: dict, row: dict, logger) -> None:
    """Warns when the validation loss rises while the training loss falls."""
    last_eval = watch["last_eval"]
    if last_eval is not None and ev["eval/loss"] > last_eval[0] and row["loss"] < last_eval[1]:
        logger.warn(
            f"validation loss rose ({last_eval[0]:.4f} -> {ev['eval/loss']:.4f}) while "
            "training loss fell: the model may be overfitting"
        )
    watch["last_eval"] = [float(ev["eval/loss"]), row["loss"]]


def _ev(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith(("eval/", "tasks/"))}
