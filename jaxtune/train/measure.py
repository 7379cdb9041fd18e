"""``jaxtune plan --measure N``: run the planned step on the local devices and time it.

The step ``jaxtune plan`` compiled is run N times on made-up weights and a made-up
batch of the planned shape (no checkpoint, no data: an 8B plan can be measured on a GPU
before the weights are downloaded). What comes out is what the plan can only estimate:
seconds per step, tokens/s, MFU against the chip's bf16 peak, and the device
allocator's peak (``peak_bytes_in_use``: the figure ``torch.cuda.max_memory_allocated``
reports for PyTorch trainers; not available on CPU).

Every array is filled on its devices by one fused elementwise program (a hash of the
element index), so no host copy and no float32 temporary of a weight ever exists: the
allocator's peak is the step's, not the set-up's.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

_NORM_HINTS = ("norm", "ln_")


def _hash(shape) -> jax.Array:
    """uint32 pseudo-random bits of ``shape`` from the element index (fuses to one loop)."""
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride)
        stride *= shape[d]
    h = idx * jnp.uint32(2654435761)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(2246822519)
    return h ^ (h >> 13)


def _fill(x: jax.ShapeDtypeStruct, sharding, kind: str) -> jax.Array:
    """One array like ``x`` on ``sharding``: ``weight`` (uniform +-0.02, integer codes
    uniform), ``one`` (norm scales), ``zero`` (optimizer state, counters)."""
    dtype, shape = jnp.dtype(x.dtype), tuple(x.shape)

    @functools.partial(jax.jit, out_shardings=sharding)
    def make():
        if kind == "zero" or not shape:
            return jnp.zeros(shape, dtype)
        if kind == "one":
            return jnp.ones(shape, dtype)
        h = _hash(shape)
        if jnp.issubdtype(dtype, jnp.floating):
            u = (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24))  # [0, 1)
            return ((u - 0.5) * 0.04).astype(dtype)
        if dtype == jnp.int8:
            return ((h >> 8) & 0xFF).astype(jnp.int32).astype(jnp.int8)
        return (h >> 8).astype(dtype)

    return make()


def _kind(path) -> str:
    name = jax.tree_util.keystr(path).lower()
    return "one" if any(hint in name for hint in _NORM_HINTS) else "weight"


def made_up_args(abstract: tuple, shardings: tuple, vocab: int) -> tuple:
    """Concrete (state, frozen, batch) for a compiled train step.

    Args:
      abstract: the ``ShapeDtypeStruct`` arguments the step was lowered with: (train
        state ``{"step", "params", "opt_state", "seed"}``, frozen weights, batch of
        [A,] B, T int32 arrays + float32 ``loss_weights``).
      shardings: the compiled step's input shardings, same structure.
      vocab: token ids are drawn below it.
    """
    state, frozen, batch = abstract
    s_state, s_frozen, s_batch = shardings

    def weights(tree, sh):
        return jax.tree_util.tree_map_with_path(lambda p, x, s: _fill(x, s, _kind(p)), tree, sh)

    new_state = {
        "step": _fill(state["step"], s_state["step"], "zero"),
        "seed": _fill(state["seed"], s_state["seed"], "zero"),
        "params": weights(state["params"], s_state["params"]),
        "opt_state": jax.tree.map(
            lambda x, s: _fill(x, s, "zero"), state["opt_state"], s_state["opt_state"]
        ),
    }
    shape = tuple(batch["input_ids"].shape)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, shape, dtype=np.int32)
    host = {
        "input_ids": ids,
        "targets": np.roll(ids, -1, axis=-1),
        "loss_weights": np.ones(shape, np.float32),
        "attention_mask": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(shape[-1], dtype=np.int32), shape),
        "segment_ids": np.ones(shape, np.int32),
    }
    new_batch = {k: jax.device_put(host[k], s_batch[k]) for k in batch}
    return new_state, weights(frozen, s_frozen), new_batch


def measure_steps(compiled, abstract: tuple, *, steps: int, vocab: int, devices) -> dict:
    """Runs ``compiled`` ``steps`` + 1 times (the first is not timed) on made-up inputs.

    Returns:
      ``{"steps", "step_s" (median), "step_s_min", "losses", "peak_bytes_in_use"}``;
      the peak is the most any one device's allocator held since the process started
      (None where the backend keeps no statistics, e.g. CPU).
    """
    state, frozen, batch = made_up_args(abstract, compiled.input_shardings[0], vocab)
    times, losses = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        loss = float(jax.device_get(metrics["loss"]))  # waits for the step
        if i:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    peaks = [
        (d.memory_stats() or {}).get("peak_bytes_in_use")
        for d in devices
        if d.process_index == jax.process_index()
    ]
    peaks = [p for p in peaks if p is not None]
    return {
        "steps": steps,
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "losses": losses,
        "peak_bytes_in_use": max(peaks) if peaks else None,
    }
