"""The sharded train state and the jitted step, shared by ``jaxtune train`` and ``plan``.

State is ``{"step", "params", "opt_state", "seed"}``: the trainable partition, its
optimizer state, and two replicated scalars. Every leaf has an explicit sharding on the
mesh, derived from the parameters' logical axes (optimizer moments inherit their
parameter's metadata, so Adam's ``mu``/``nu`` are split exactly like the weights). The
same functions build the state from live arrays (training) or from ``ShapeDtypeStruct``
leaves (ahead-of-time compilation for a pod that is not attached).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxtune.optim import build_optimizer
from jaxtune.peft.trainable import summary
from jaxtune.sharding import batch_sharding, replicated, state_shardings
from jaxtune.train.step import make_train_step


def train_state_shardings(params, opt_state, mesh: Mesh) -> dict:
    """NamedShardings for a train state built from ``params`` and ``opt_state``."""
    rep = replicated(mesh)
    return {
        "step": rep,
        "params": state_shardings(params, mesh),
        "opt_state": state_shardings(opt_state, mesh),
        "seed": rep,
    }


def init_opt_state(tx: optax.GradientTransformation, params, mesh: Mesh):
    """``tx.init(params)`` placed on the optimizer state's own shardings.

    Without explicit output shardings XLA is free to replicate the zeros of Adam's
    moments (they do not depend on the parameters' values), which would cost every
    device the full optimizer state under FSDP.
    """
    shardings = state_shardings(jax.eval_shape(tx.init, params), mesh)
    return jax.jit(tx.init, out_shardings=shardings)(params)


def make_state(step: int, params, opt_state, seed: int, mesh: Mesh) -> dict:
    """The train state dict, every leaf on the mesh."""
    rep = replicated(mesh)
    return {
        "step": jax.device_put(jnp.asarray(step, jnp.int32), rep),
        "params": params,
        "opt_state": opt_state,
        "seed": jax.device_put(jnp.asarray(seed, jnp.uint32), rep),
    }


def abstract_state(params, opt_state) -> dict:
    """A train state of ``ShapeDtypeStruct`` leaves (for ``jit(...).lower``)."""
    return {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": params,
        "opt_state": opt_state,
        "seed": jax.ShapeDtypeStruct((), jnp.uint32),
    }


def jit_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    state_sh: dict,
    frozen_sh,
    mesh: Mesh,
    *,
    grad_accum: int = 1,
    dropout: bool = False,
    loss_sums,
    batch_ndims: dict[str, int],
):
    """``jit(train_step)`` with explicit in/out shardings and the state donated.

    ``loss_sums``: the task's ``(model, micro_batch, rng) -> (loss sum, weight sum)``;
    ``batch_ndims``: ``{key: ndim}`` of one micro-batch (e.g. ``labels``: 1).

    Explicit shardings make the compiled program independent of how the inputs happen
    to be placed (one compilation per batch shape, none per step) and let ``plan``
    compile the very same program for abstract devices. Donating the state lets XLA
    update parameters and optimizer state in place (no second copy in memory).
    """
    lead = 0 if grad_accum == 1 else 1
    batch_sh = {k: batch_sharding(mesh, n + lead, lead) for k, n in batch_ndims.items()}
    fn = make_train_step(graphdef, tx, grad_accum=grad_accum, dropout=dropout, loss_sums=loss_sums)
    return jax.jit(
        fn,
        in_shardings=(state_sh, frozen_sh, batch_sh),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=(0,),
    )


@dataclass
class StepSetup:
    """What :func:`setup_step` builds: the split model, optimizer, state and jitted step.

    ``params`` / ``opt_state`` are live arrays on the mesh, or ``ShapeDtypeStruct``
    leaves when set up for ``plan`` (``abstract=True``); ``info`` is
    ``peft.trainable.summary`` of the model.
    """

    graphdef: Any
    params: Any
    frozen: Any
    tx: optax.GradientTransformation
    opt_state: Any
    step_fn: Any
    info: dict


def setup_step(task, model, mesh: Mesh, n_steps: int, *, abstract: bool = False) -> StepSetup:
    """Splits ``model`` by the task's trainable filter and builds its optimizer and jitted
    step: the one setup of ``jaxtune train`` and ``jaxtune plan``.

    Args:
      task: the run's :class:`~jaxtune.train.task.Task` (trainable filter, loss, batch).
      model: the model, placed on ``mesh`` (or abstract, for ``plan``).
      n_steps: optimizer steps of the run (the learning-rate schedule's length).
      abstract: the optimizer state as shapes only (``plan`` compiles, never allocates).
    """
    cfg = task.cfg
    filt = task.trainable(model)
    info = summary(model, filt)
    graphdef, params, frozen = nnx.split(model, filt, ...)
    tx = build_optimizer(cfg.optim, n_steps, params)
    if abstract:
        opt_state = jax.eval_shape(tx.init, params)
    else:
        opt_state = init_opt_state(tx, params, mesh)
    step_fn = jit_train_step(
        graphdef,
        tx,
        train_state_shardings(params, opt_state, mesh),
        state_shardings(frozen, mesh),
        mesh,
        grad_accum=cfg.train.grad_accum,
        dropout=cfg.peft.dropout > 0,
        loss_sums=task.loss_sums,
        batch_ndims=task.batch_ndims,
    )
    return StepSetup(graphdef, params, frozen, tx, opt_state, step_fn, info)
