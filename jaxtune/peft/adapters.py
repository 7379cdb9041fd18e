"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), identity at init.

An adapter is ``h + up(act(down(h)))`` on a sublayer's output h [B, T, D], before the
residual add. Placements: ``houlsby`` puts one after attention and one after the MLP,
``pfeiffer`` only after the MLP. They fill the ``attn_adapter`` / ``mlp_adapter`` slots
of a decoder block, so every family whose block has those slots supports them.

The up-projection (weights and bias) starts at zero, so the model is unchanged at init
and the first step's gradients reach ``up`` (the down-projection starts receiving
gradient once ``up`` is non-zero). Weights are :class:`AdapterParam`, their own
Variable type: ``nnx.split(model, AdapterParam, ...)`` selects exactly them. Like
``nnx.LoRAParam`` it subclasses ``nnx.Param``, so generic "all parameters" code
(counts, sharding by logical axes) still sees them.

When layers are stacked (scanned), adapter weights are stacked too ([L, ...]).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import ConfigError
from jaxtune.models.layers import Linear, dropout

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}
PLACEMENTS = {"houlsby": ("attn_adapter", "mlp_adapter"), "pfeiffer": ("mlp_adapter",)}


class AdapterParam(nnx.Param):
    """Weights of bottleneck adapters (their own collection, selected by type)."""


class BottleneckAdapter(nnx.Module):
    """``h + up(act(down(h)))`` with down [*lead, D, A] and up [*lead, A, D] (A = size)."""

    def __init__(
        self,
        dim: int,
        size: int,
        *,
        activation: str = "gelu",
        dropout: float = 0.0,
        lead: Sequence[int] = (),
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        lead = tuple(lead)
        lax_ = ("layers",) * len(lead)
        # Small normal init for down (as adapter-transformers does); up is zero so the
        # adapter is the identity until trained.
        down = jax.random.normal(rngs.params(), (*lead, dim, size), dtype) * 0.01
        self.down = AdapterParam(down, axes=(*lax_, "embed", "adapter"))
        self.down_bias = AdapterParam(jnp.zeros((*lead, size), dtype), axes=(*lax_, "adapter"))
        self.up = AdapterParam(
            jnp.zeros((*lead, size, dim), dtype), axes=(*lax_, "adapter", "embed")
        )
        self.up_bias = AdapterParam(jnp.zeros((*lead, dim), dtype), axes=(*lax_, "embed"))
        self.activation = activation
        self.dropout = float(dropout)

    def __call__(self, h: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """h: [..., D] -> [..., D] in h's dtype; ``rng`` enables dropout (training)."""
        z = h @ self.down[...].astype(h.dtype) + self.down_bias[...].astype(h.dtype)
        z = ACTIVATIONS[self.activation](z)
        z = dropout(z, self.dropout, rng)
        return h + z @ self.up[...].astype(h.dtype) + self.up_bias[...].astype(h.dtype)


def adapter_size(hidden: int, size: int | None, reduction: int) -> int:
    """Bottleneck width: ``size`` if given, else ``hidden // reduction`` (at least 1)."""
    if size is not None:
        if not isinstance(size, int) or size <= 0:
            raise ConfigError(f"peft.adapter_size: must be a positive integer, got {size!r}")
        return size
    if not isinstance(reduction, int) or reduction <= 0:
        raise ConfigError(f"peft.adapter_reduction: must be a positive integer, got {reduction!r}")
    return max(1, hidden // reduction)


def _blocks(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """Modules with adapter slots (decoder blocks), outermost first."""
    return [
        (tuple(p), m)
        for p, m in nnx.iter_modules(model)
        if hasattr(m, "attn_adapter") and hasattr(m, "mlp_adapter")
    ]


def _lead(block: nnx.Module) -> tuple[int, ...]:
    # A stacked block's linear kernels are [L, in, out]; an unstacked one's [in, out].
    for _, m in nnx.iter_modules(block):
        if isinstance(m, Linear):
            return tuple(m.kernel.shape[:-2])
    return ()


def add_adapters(
    model: nnx.Module,
    *,
    placement: str = "houlsby",
    size: int | None = None,
    reduction: int = 16,
    activation: str = "gelu",
    dropout: float = 0.0,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
) -> int:
    """Adds bottleneck adapters to every decoder block, in place.

    Args:
      model: a model whose blocks have ``attn_adapter`` / ``mlp_adapter`` slots and whose
        config has ``hidden_size``.
      placement: ``houlsby`` (after attention and MLP) or ``pfeiffer`` (after MLP).
      size: bottleneck width; None = ``hidden_size // reduction``.
      activation: ``gelu``, ``relu``, ``silu`` or ``tanh``.
      dropout: dropout on the bottleneck activations (training only).
      dtype: adapter weight dtype (float32 by default, like LoRA factors).

    Returns:
      The number of adapter modules added (a stacked block counts once per slot).

    Raises:
      ConfigError: unknown placement / activation, bad size, no blocks, or adapters
        already present.
    """
    if placement not in PLACEMENTS:
        raise ConfigError(
            f"peft.adapter_placement: {placement!r} is not one of {sorted(PLACEMENTS)}"
        )
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"peft.adapter_activation: {activation!r} is not one of {sorted(ACTIVATIONS)}"
        )
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"peft.dropout: must be in [0, 1), got {dropout!r}")
    hidden = model.config.hidden_size
    width = adapter_size(hidden, size, reduction)
    blocks = _blocks(model)
    if not blocks:
        raise ConfigError(f"peft.method adapter: {type(model).__name__} has no adapter slots")
    if has_adapters(model):
        raise ConfigError("peft: the model already has bottleneck adapters")
    n = 0
    for _, block in blocks:
        lead = _lead(block)
        for slot in PLACEMENTS[placement]:
            adapter = BottleneckAdapter(
                hidden,
                width,
                activation=activation,
                dropout=dropout,
                lead=lead,
                dtype=dtype,
                rngs=rngs,
            )
            setattr(block, slot, nnx.data(adapter))
            n += 1
    return n


def has_adapters(model: nnx.Module) -> bool:
    return bool(nnx.to_flat_state(nnx.state(model, AdapterParam)))
