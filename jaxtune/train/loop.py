"""The host training loop: data, steps, evaluation, logging, checkpoints, preemption.

``train(cfg)`` is what ``jaxtune train`` runs. Re-running it with the same ``run.dir``
resumes from the latest checkpoint: step, trainable params, optimizer state and data
position are restored, and per-step randomness is a function of (seed, step), so the
resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.checkpoint import Checkpointer, scan_layers_for
from jaxtune.config import Config, save_config, validate_against_devices
from jaxtune.errors import ConfigError, TrainingError
from jaxtune.sharding import batch_sharding, make_mesh, replicated, variable_sharding
from jaxtune.train.logger import MetricsLogger
from jaxtune.train.step import make_eval_step, make_train_step, stack_micro_batches


def prepare_run_dir(cfg: Config) -> tuple[Path, bool]:
    """(run dir, whether to resume). Refuses to clobber a non-empty dir unless asked."""
    run_dir = Path(cfg.run.dir)
    has_ckpt = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    if cfg.train.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
        has_ckpt = False
    elif run_dir.exists() and any(run_dir.iterdir()) and not (cfg.train.resume and has_ckpt):
        if not cfg.train.resume or not has_ckpt:
            raise ConfigError(
                f"run.dir {run_dir} is not empty and holds no checkpoint to resume; "
                "choose another run.dir or pass train.overwrite=true"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, bool(has_ckpt and cfg.train.resume)


def device_batch(batch: dict, mesh, leading: int = 0) -> dict:
    """Host-local numpy batch -> global jax arrays sharded over (data, fsdp)."""
    out = {}
    for k, v in batch.items():
        if k == "labels":
            continue
        sharding = batch_sharding(mesh, v.ndim, leading)
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


class _Preempt:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def build_model(cfg: Config, mesh):
    """Base model loaded into its shards, plus PEFT modules, placed on the mesh."""
    from jaxtune.api import from_pretrained
    from jaxtune.peft.trainable import apply_peft
    from jaxtune.sharding import shard_model

    if not cfg.model.path:
        raise ConfigError(
            "model.path is required (an HF dir, a .gguf file or a jaxtune checkpoint)"
        )
    model = from_pretrained(
        cfg.model.path,
        dtype=cfg.model.dtype,
        scan_layers=scan_layers_for(cfg),
        remat=cfg.model.remat,
        sharding=variable_sharding(mesh),
    )
    if cfg.model.compute_dtype:
        model.compute_dtype = jnp.dtype(cfg.model.compute_dtype)
    apply_peft(model, cfg.peft, rngs=nnx.Rngs(cfg.train.seed))
    return shard_model(model, mesh)


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
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


def train(cfg: Config, *, stop_after: int | None = None) -> dict:
    """Runs (or resumes) a fine-tuning run; returns a summary dict.

    ``stop_after`` ends this invocation after that global step with a checkpoint, as a
    preemption would (time-boxed jobs; resume tests). The schedule still spans all steps.
    """
    from jaxtune.api import load_tokenizer
    from jaxtune.data import BatchIterator, build_datasets
    from jaxtune.optim import build_optimizer, lr_schedule
    from jaxtune.peft.trainable import summary, trainable_filter

    t_start = time.perf_counter()
    data_n, fsdp_n, tensor_n = validate_against_devices(
        cfg, jax.device_count(), jax.process_count()
    )
    mesh = make_mesh(data_n, fsdp_n, tensor_n)
    run_dir, resume = prepare_run_dir(cfg)
    if jax.process_index() == 0:
        save_config(cfg, run_dir / "config.yaml")

    tokenizer = load_tokenizer(cfg.model.path)
    datasets = build_datasets(cfg.data, tokenizer, cfg.train.seq_len)
    if "train" not in datasets:
        raise ConfigError("data.train is required")
    model = build_model(cfg, mesh)
    filt = trainable_filter(model, cfg.peft)
    info = summary(model, filt)
    print(info["text"] if isinstance(info, dict) and "text" in info else info)
    graphdef, params, frozen = nnx.split(model, filt, ...)
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
    opt_state = jax.jit(tx.init)(params)
    ckpt = Checkpointer(
        run_dir,
        keep=cfg.checkpoint.keep,
        keep_best=cfg.checkpoint.keep_best,
        best_metric=cfg.checkpoint.best_metric,
        best_mode=cfg.checkpoint.best_mode,
        async_save=cfg.checkpoint.async_save,
    )
    start_step = 0
    if resume and ckpt.latest_step() is not None:
        start_step = ckpt.latest_step()
        params, opt_state, data_state, _ = ckpt.restore(start_step, params, opt_state)
        it.restore(data_state)
        print(f"resumed {run_dir} at step {start_step}")
    state = {
        "step": jnp.asarray(start_step, jnp.int32),
        "params": params,
        "opt_state": opt_state,
        "seed": jnp.asarray(cfg.train.seed, jnp.uint32),
    }
    # Scalars (step, seed, optimizer counters) may sit on one device: replicate them so
    # every input and output of the step lives on the mesh.
    rep = replicated(mesh)
    state = jax.tree.map(
        lambda x: x if getattr(x.sharding, "mesh", None) == mesh else jax.device_put(x, rep), state
    )
    shardings = jax.tree.map(lambda x: x.sharding, state)
    dropout = cfg.peft.dropout > 0
    step_fn = jax.jit(
        make_train_step(graphdef, tx, grad_accum=cfg.train.grad_accum, dropout=dropout),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    eval_fn = jax.jit(make_eval_step(graphdef))
    val = datasets.get("validation")
    logger = MetricsLogger(run_dir, cfg, n_steps, start_step, params=info)
    saved = {"step": start_step}

    def save(step_no: int, metrics: dict) -> None:
        if saved["step"] != step_no:
            ckpt.save(
                step_no, state["params"], state["opt_state"], it.state(), {"step": step_no}, metrics
            )
            saved["step"] = step_no

    nan_message = None
    stop_reason = "completed"
    best, bad_evals, last_eval = None, 0, None
    with _Preempt() as pre:
        for step in range(start_step, n_steps):
            micro = [next(it) for _ in range(cfg.train.grad_accum)]
            batch = micro[0] if cfg.train.grad_accum == 1 else stack_micro_batches(micro)
            lead = 0 if cfg.train.grad_accum == 1 else 1
            t0 = time.perf_counter()
            state, metrics = step_fn(state, frozen, device_batch(batch, mesh, lead))
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                nan_message = f"loss became {loss} at step {step + 1}; stopped (the last good checkpoint is kept)"
                break
            row = {
                "step": step + 1,
                "loss": loss,
                "lr": float(schedule(step)),
                "grad_norm": float(metrics["grad_norm"]),
                "tokens": float(metrics["tokens"]),
                "seq_tokens": int(batch["attention_mask"].sum()) * jax.process_count(),
                "step_time": time.perf_counter() - t0,
                "epoch": it.epoch,
            }
            do_eval = (
                val is not None and cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0
            )
            if do_eval or (val is not None and step + 1 == n_steps):
                ev = evaluate_loss(eval_fn, state["params"], frozen, val, cfg, mesh)
                row.update(ev)
                if last_eval is not None and ev["eval/loss"] > last_eval[0] and loss < last_eval[1]:
                    logger.warn(
                        f"validation loss rose ({last_eval[0]:.4f} -> {ev['eval/loss']:.4f}) while "
                        "training loss fell: the model may be overfitting"
                    )
                last_eval = (ev["eval/loss"], loss)
                metric = ev.get(cfg.train.early_stopping_metric)
                if metric is not None:
                    if best is None or metric < best:
                        best, bad_evals = metric, 0
                    else:
                        bad_evals += 1
            logger.log(row)
            every = cfg.checkpoint.every
            if (every and (step + 1) % every == 0) or pre.signal:
                save(step + 1, _ev(row))
            if stop_after is not None and step + 1 >= stop_after and step + 1 < n_steps:
                save(step + 1, _ev(row))
                stop_reason = f"stopped after step {step + 1}"
                break
            if pre.signal:
                stop_reason = f"stopped by {pre.signal}"
                break
            if cfg.train.early_stopping_patience and bad_evals >= cfg.train.early_stopping_patience:
                stop_reason = f"early stopping: {cfg.train.early_stopping_metric} did not improve"
                break
    final_step = int(state["step"])
    if nan_message is None:
        save(final_step, {})
    ckpt.close()
    logger.close(stop_reason)
    if nan_message:
        raise TrainingError(nan_message)
    summary_out = {
        "run_dir": str(run_dir),
        "steps": final_step,
        "stop_reason": stop_reason,
        "final_loss": logger.last.get("loss"),
        "eval": {k: v for k, v in logger.last.items() if k.startswith("eval/")},
        "seconds": time.perf_counter() - t_start,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary_out, indent=2))
    return summary_out


def _ev(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith("eval/")}
