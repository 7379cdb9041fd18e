"""Device mesh (data, fsdp, tensor) and the logical-axis rules that shard parameters.

Models only name logical axes (``embed``, ``mlp``, ``heads``...). This table is the one
place that says which mesh axis each one is split over:

- ``data``: pure data parallelism (params replicated).
- ``fsdp``: batch split *and* parameters split along ``embed`` (ZeRO-3 style): each
  device holds 1/fsdp of every weight; XLA all-gathers it just in time.
- ``tensor``: Megatron-style splits of heads / mlp / vocab.

A dimension that does not divide by its mesh axis is replicated rather than failing, so
small models (tiny tests, a 9-head SmolLM2) still run on any mesh.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# Rules are tried in order per logical axis; None = replicated.
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "lora_rank": None,
    "adapter": None,
    "classes": None,
}


def make_mesh(data: int, fsdp: int, tensor: int, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all devices)."""
    devices = list(devices if devices is not None else jax.devices())
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh {data}x{fsdp}x{tensor} != {len(devices)} devices")
    grid = None
    if devices[0].platform == "tpu":
        # Physical layout matters on TPU (the ICI torus): let JAX place the innermost
        # (tensor, fsdp) axes on neighbouring chips.
        from jax.experimental import mesh_utils

        try:
            grid = mesh_utils.create_device_mesh((data, fsdp, tensor), devices)
        except (ValueError, NotImplementedError, AssertionError):
            grid = None
    if grid is None:
        # Process-major order: hosts split the outermost (data) axis first.
        grid = np.asarray(devices, dtype=object).reshape(data, fsdp, tensor)
    return Mesh(grid, MESH_AXES)


def spec_for(axes, shape, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array with logical ``axes`` and ``shape`` on ``mesh``."""
    if axes is None or len(axes) != len(shape):
        # No names, or names of another shape: optimizer statistics such as Adafactor's
        # factored rows/columns inherit their parameter's metadata but not its rank.
        axes = (None,) * len(shape)
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape, strict=True):
        rule = LOGICAL_AXIS_RULES.get(name) if name else None
        names = (rule,) if isinstance(rule, str) else tuple(rule or ())
        names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if not names or dim % size:
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def variable_sharding(mesh: Mesh):
    """``(path, variable) -> NamedSharding`` from each variable's ``axes`` metadata."""

    def fn(path, var) -> NamedSharding:
        axes = var.get_metadata().get("axes")
        return NamedSharding(mesh, spec_for(axes, var.shape, mesh))

    return fn


def state_shardings(state, mesh: Mesh):
    """A pytree of NamedSharding matching ``state`` (an ``nnx.State`` or any pytree).

    ``nnx.Variable`` leaves (live or abstract, also inside optimizer states, which
    inherit their parameter's metadata) are sharded by their ``axes``; every other leaf
    (step counters, scalars) is replicated.
    """
    fn = variable_sharding(mesh)
    return jax.tree.map(
        lambda v: (
            fn(None, v) if isinstance(v, nnx.Variable) else NamedSharding(mesh, PartitionSpec())
        ),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def batch_sharding(mesh: Mesh, ndim: int = 2, leading: int = 0) -> NamedSharding:
    """Batch arrays: the batch dim (after ``leading`` dims) split over data x fsdp."""
    spec = [None] * ndim
    spec[leading] = ("data", "fsdp")
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Places every variable of ``model`` on its sharding (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def per_device_bytes(tree) -> int:
    """Largest number of bytes any single device holds for a pytree of arrays."""
    per: dict = {}
    for x in jax.tree.leaves(tree):
        if not hasattr(x, "addressable_shards"):
            continue
        for s in x.addressable_shards:
            per[s.device] = per.get(s.device, 0) + s.data.nbytes
    return max(per.values()) if per else 0


def device_batch(batch: dict, mesh, leading: int = 0) -> dict:
    """Host-local numpy batch -> global jax arrays sharded over (data, fsdp).

    Each host passes only its own rows; ``make_array_from_process_local_data``
    assembles the global batch without any host seeing the others' data. ``leading``:
    axes before the batch axis (1 for stacked micro-batches [A, B, ...]).
    """
    out = {}
    for k, v in batch.items():
        sharding = batch_sharding(mesh, v.ndim, leading)
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out
