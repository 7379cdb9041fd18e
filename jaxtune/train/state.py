"""The sharded train state and the jitted step, shared by ``jaxtune train`` and ``plan``.

State is ``{"step", "params", "opt_state", "seed"}``: the trainable partition, its
optimizer state, and two replicated scalars. Every leaf has an explicit sharding on the
mesh, derived from the parameters' logical axes (optimizer moments inherit their
parameter's metadata, so Adam's ``mu``/``nu`` are split exactly like the weights). The
same functions build the state from live arrays (training) or from ``ShapeDtypeStruct``
leaves (ahead-of-time compilation for a pod that is not attached).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxtune.sharding import batch_sharding, replicated, state_shardings
from jaxtune.train.step import make_train_step

# Keys of a device batch (``labels`` only matters to classification heads).
BATCH_KEYS = ("input_ids", "targets", "loss_weights", "attention_mask", "positions", "segment_ids")


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


def abstract_batch(batch_size: int, seq_len: int, grad_accum: int = 1) -> dict:
    """``ShapeDtypeStruct`` batch of the longest shape a run can see ([A,] B, T)."""
    lead = (grad_accum,) if grad_accum > 1 else ()
    shape = (*lead, batch_size, seq_len)
    return {
        k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_weights" else jnp.int32)
        for k in BATCH_KEYS
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
    loss_sums=None,
    batch_ndims: dict[str, int] | None = None,
):
    """``jit(train_step)`` with explicit in/out shardings and the state donated.

    ``loss_sums`` defaults to next-token loss (see :func:`make_train_step`);
    ``batch_ndims`` (``{key: ndim}`` of one micro-batch, e.g. ``labels``: 1) gives the
    batch's keys when they are not all [B, T].

    Explicit shardings make the compiled program independent of how the inputs happen
    to be placed (one compilation per batch shape, none per step) and let ``plan``
    compile the very same program for abstract devices. Donating the state lets XLA
    update parameters and optimizer state in place (no second copy in memory).
    """
    lead = 0 if grad_accum == 1 else 1
    batch_sh = batch_sharding(mesh, 2 + lead, lead)
    if batch_ndims is not None:
        batch_sh = {k: batch_sharding(mesh, n + lead, lead) for k, n in batch_ndims.items()}
    kw = {} if loss_sums is None else {"loss_sums": loss_sums}
    fn = make_train_step(graphdef, tx, grad_accum=grad_accum, dropout=dropout, **kw)
    return jax.jit(
        fn,
        in_shardings=(state_sh, frozen_sh, batch_sh),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=(0,),
    )
