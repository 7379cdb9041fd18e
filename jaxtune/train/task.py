"""The task interface: what a training objective supplies to the one loop.

The trainer (:mod:`jaxtune.train.loop`) knows nothing about what it optimises. A task
gives it:

- the batch it consumes (:attr:`Task.batch_ndims`: keys of one micro-batch and their
  ranks, taken from the data iterator's rows);
- the model and which of its parameters train (:meth:`Task.build_model`,
  :meth:`Task.trainable`; ``plan`` uses :meth:`Task.abstract_model`);
- loss *sums* for a micro-batch (:meth:`Task.loss_sums`: ``(sum, weight)``, so gradient
  accumulation divides once by the total weight and equals one big batch; optionally
  metric sums too, logged with each step);
- validation metrics (:meth:`Task.evaluate`, ``eval/loss`` among them) and a final
  report on the held-out split (:meth:`Task.finish`);
- what the run directory keeps besides the checkpoints (:meth:`Task.run_files`, written
  with ``config.yaml`` once every check has passed; a resumed run is checked against
  them in :meth:`Task.prepare`).

A checkpoint holds the trainable partition and its optimizer state, whatever the task
(:meth:`Task.trainable` decides what that is); a run exports as the model it builds
(an LM as a merged HF dir or PEFT adapter, a classifier as ``*ForSequenceClassification``).

Adding a task: one module defining a :class:`Task` subclass decorated with
:func:`register`, imported by :mod:`jaxtune.train.tasks` (or by the caller, e.g. a
test); a run selects it with ``train.objective: <name>``
(:func:`jaxtune.train.tasks.task_for`).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.config import Config
from jaxtune.loading import build_model
from jaxtune.peft.trainable import abstract_peft_model, trainable_filter

TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: makes ``cls`` selectable as ``train.objective: cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a task needs a name")
    TASKS[cls.name] = cls
    return cls


class Task:
    """Base class; subclasses set :attr:`name` and :attr:`batch_ndims` and override
    :meth:`loss_sums` (and whatever else differs from causal-LM fine-tuning)."""

    name: ClassVar[str] = ""
    # Keys of one micro-batch the step consumes -> ndim ([B] = 1, [B, T] = 2).
    batch_ndims: ClassVar[dict[str, int]] = {}
    # Whether the trained model is a causal LM (generation samples and retention
    # benchmarks apply); False for a classifier head.
    language_model: ClassVar[bool] = True

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # -------------------------------------------------------- before anything is written

    def prepare(self, datasets: dict, previous_run: Path | None) -> None:
        """Checks the data for this task (and against ``previous_run``, the run dir of a
        resumed run, None when starting over); writes nothing."""

    def fit_without_steps(self) -> bool:
        """True when this config is fitted in closed form (no gradient steps): the loop
        then calls :meth:`fit` instead of stepping."""
        return False

    def fit(self, run_dir: Path, commit, t_start: float) -> dict:
        """Fits without gradient steps; ``commit(run_files)`` creates the run dir. Returns
        the run summary."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ the model

    def build_model(self, mesh) -> nnx.Module:
        """The model ``cfg`` describes (base + PEFT), loaded into its shards on ``mesh``."""
        return build_model(self.cfg, mesh)

    def abstract_model(self, model_cfg) -> nnx.Module:
        """The same model with ``ShapeDtypeStruct`` leaves (``jaxtune plan``)."""
        c = self.cfg.model
        return abstract_peft_model(
            model_cfg, self.cfg.peft, jnp.dtype(c.dtype), quantize=c.quantize
        )

    def trainable(self, model: nnx.Module):
        """The trainable filter (the rest is frozen: no gradients, no optimizer state)."""
        return trainable_filter(model, self.cfg.peft)

    # ------------------------------------------------------------------------- the step

    def loss_sums(self, model, batch: dict, rng) -> tuple:
        """(loss sum, weight sum) of one micro-batch; traced inside the jitted step.

        A task may add a third element, ``{name: metric sum}``: accumulated over
        micro-batches like the loss, divided by the same total weight and logged under
        ``name`` with each step (e.g. a preference task's ``rewards/margins``).
        """
        raise NotImplementedError

    def abstract_batch(self, batch_size: int, seq_len: int, grad_accum: int = 1) -> dict:
        """``ShapeDtypeStruct`` batch of the longest shape a run can see ([A,] B[, T])."""
        lead = (grad_accum,) if grad_accum > 1 else ()
        out = {}
        for k, nd in self.batch_ndims.items():
            shape = (*lead, batch_size, seq_len)[: len(lead) + nd]
            dtype = jnp.float32 if k == "loss_weights" else jnp.int32
            out[k] = jax.ShapeDtypeStruct(shape, dtype)
        return out

    def batch(self, rows: dict) -> dict:
        """The step's micro-batch from the data iterator's host batch."""
        return {k: rows[k] for k in self.batch_ndims}

    # ---------------------------------------------------------------------- evaluation

    def evaluate(self, model, dataset, mesh) -> dict:
        """Validation metrics of ``model`` on ``dataset`` (``eval/loss`` among them)."""
        raise NotImplementedError

    def run_files(self) -> dict[str, str]:
        """Files the run dir keeps beside ``config.yaml`` (name -> text)."""
        return {}

    def finish(self, model, datasets: dict, run_dir: Path, step: int) -> dict:
        """Final report on the held-out split after training; summary metrics."""
        return {}
