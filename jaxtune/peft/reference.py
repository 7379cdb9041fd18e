"""The reference model of preference tuning (DPO): the policy as it was before training.

DPO compares the policy's log-probabilities with a frozen reference's. Keeping a second
model would double the base weights, so the reference is a *view* of the policy
(:func:`reference_model`):

* adapters switched off: LoRA / DoRA slots emptied and bottleneck adapters removed, so
  with ``peft.method`` lora, dora or adapter the reference is the base model and costs
  no memory (TRL does the same with PEFT's ``disable_adapter``);
* trainable *base* weights (``peft.method: full``, or ``peft.unfreeze`` groups next to
  an adapter) have moved away from the reference by the first update, so exactly those
  are copied once at the start (:func:`attach_reference`) into
  :class:`ReferenceWeight` variables on the model. They are not ``nnx.Param``, so they
  are never trainable and never checkpointed: they sit in the frozen partition of the
  train step, sharded like the weights they copy (same logical axes). A resumed run
  copies them again from the base model, which is the same reference.

Everything here works on abstract models too (``jaxtune plan``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.models.layers import Linear
from jaxtune.peft.adapters import AdapterParam

REFERENCE_ATTR = "preference_reference"
_ADAPTER_SLOTS = ("attn_adapter", "mlp_adapter")


class ReferenceWeight(nnx.Variable):
    """A frozen copy of a trainable base parameter, read only by the reference model."""


class ReferenceCopy(nnx.Module):
    """The copied weights: ``weights[i]`` is the start value of the parameter at
    ``paths[i]`` (a static tuple of model paths)."""

    def __init__(self, paths: tuple[tuple, ...], weights: list[ReferenceWeight]):
        self.paths = nnx.static(tuple(paths))
        self.weights = nnx.List(weights)


def _copy(v: nnx.Variable) -> ReferenceWeight:
    value = v.get_value()
    if not isinstance(value, jax.ShapeDtypeStruct):
        # A real copy on the same devices: the policy's buffer is donated and updated.
        value = jax.device_put(jnp.copy(value), value.sharding)
    return ReferenceWeight(value, **v.get_metadata())


def attach_reference(model: nnx.Module, trainable) -> int:
    """Copies the trainable base parameters of ``model`` into a frozen reference (in place).

    Args:
      model: the policy (live or abstract), adapters already added.
      trainable: the run's trainable filter; LoRA / DoRA / adapter weights among it are
        not copied (the reference drops them).

    Returns:
      The number of parameters copied (0 for a plain LoRA / DoRA / adapter run).
    """
    flat = nnx.to_flat_state(nnx.state(model, trainable))
    base = [(tuple(p), v) for p, v in flat if not isinstance(v, (nnx.LoRAParam, AdapterParam))]
    setattr(
        model,
        REFERENCE_ATTR,
        ReferenceCopy(tuple(p for p, _ in base), [_copy(v) for _, v in base]),
    )
    return sum(int(v.size) for _, v in base)


def reference_model(model: nnx.Module) -> nnx.Module:
    """The reference view of a policy with :func:`attach_reference` (arrays shared).

    Copied base weights replace their trained values, adapters are switched off. The
    policy itself is unchanged; call inside the traced loss and stop gradients on what
    the view computes.
    """
    graphdef, state = nnx.split(model)
    copy = getattr(model, REFERENCE_ATTR, None)
    if copy is not None and copy.paths:
        starts = dict(zip(copy.paths, copy.weights, strict=True))
        flat = [
            (p, v.replace(starts[tuple(p)].get_value()) if tuple(p) in starts else v)
            for p, v in nnx.to_flat_state(state)
        ]
        state = nnx.from_flat_state(flat)
    view = nnx.merge(graphdef, state)
    for m in [m for _, m in nnx.iter_modules(view)]:  # listed first: edited as we go
        if isinstance(m, Linear):
            m.lora_a = m.lora_b = m.dora_m = None
        for slot in _ADAPTER_SLOTS:
            if getattr(m, slot, None) is not None:
                setattr(m, slot, None)
    return view
