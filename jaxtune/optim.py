"""Optimizers, learning-rate schedules and masks (an optax chain built from ``OptimConfig``).

The trainer differentiates only the trainable partition (see
``jaxtune.peft.trainable_filter``) and initialises the optimizer on that partition, so
frozen parameters hold no optimizer state and receive no update by construction: no
``optax.masked`` over frozen leaves is needed, and Adam on a LoRA run costs 2x the
*adapter* bytes, not 2x the model.

Chain: ``clip_by_global_norm`` -> optimizer (with decoupled weight decay masked off
biases, norm scales, embeddings and DoRA magnitudes) -> schedule.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from jaxtune.errors import ConfigError

OPTIMIZERS = ("adamw", "adafactor", "sgd", "lion")
SCHEDULES = ("constant", "linear", "cosine")
# Parameter names that never get weight decay, whatever their rank: stacked (scanned)
# norms and biases are 2-D ([L, D]) so the usual "ndim < 2" rule alone would miss them.
NO_DECAY_NAMES = {"bias", "scale", "embedding", "dora_m", "down_bias", "up_bias"}


def warmup_steps(cfg, total_steps: int) -> int:
    """``warmup_steps`` if set, else ``ceil(warmup_ratio * total_steps)``."""
    if cfg.warmup_steps:
        return int(cfg.warmup_steps)
    return int(math.ceil(cfg.warmup_ratio * total_steps)) if cfg.warmup_ratio else 0


def lr_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step (0-based).

    Linear warmup 0 -> ``lr`` over the warmup steps (lr is 0 at step 0, as in HF), then
    ``constant`` / ``linear`` / ``cosine`` decay to ``lr * min_lr_ratio`` at
    ``total_steps`` (held there after). Built from optax's schedules, joined at the end
    of the warmup.

    Args:
      cfg: ``OptimConfig``.
      total_steps: optimizer steps of the run (> 0).
    """
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule: {cfg.schedule!r} is not one of {list(SCHEDULES)}")
    if total_steps <= 0:
        raise ConfigError(f"train.steps: must be positive for a schedule, got {total_steps}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {cfg.min_lr_ratio}")
    peak = float(cfg.lr)
    floor = peak * float(cfg.min_lr_ratio)
    warm = warmup_steps(cfg, total_steps)
    decay_len = max(total_steps - warm, 1)
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_len)
    else:
        decay = optax.cosine_decay_schedule(peak, decay_len, alpha=float(cfg.min_lr_ratio))
    # join_schedules runs the decay on ``step - warm`` from step ``warm`` on; with no
    # warmup the boundary is 0 and the warmup piece is never used.
    warmup = optax.linear_schedule(0.0, peak, max(warm, 1))
    return optax.join_schedules([warmup, decay], boundaries=[warm])


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def decay_mask(params):
    """Pytree of bools like ``params``: True where decoupled weight decay applies.

    No decay for biases, norm scales, embeddings, DoRA magnitudes and any tensor with
    fewer than 2 dimensions. Works on ``nnx.State`` and plain dicts.
    """

    def keep(path, x):
        names = [_key_name(k) for k in path]
        if names and names[-1] == "value":  # nnx.Variable leaves end in .value
            names = names[:-1]
        name = names[-1] if names else ""
        return bool(jnp.ndim(x) >= 2 and name not in NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(keep, params)


def build_optimizer(cfg, total_steps: int, trainable_state=None) -> optax.GradientTransformation:
    """The optax chain for ``cfg``.

    Args:
      cfg: ``OptimConfig``.
      total_steps: optimizer steps of the run (sets the schedule's length).
      trainable_state: the trainable partition (``nnx.State``) the optimizer will be
        initialised on; only used to validate it is not empty. The weight-decay mask is
        computed from the parameter tree at ``init``/``update`` time.

    Returns:
      ``optax.GradientTransformation``; ``init`` it on the trainable partition only.
    """
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name: {cfg.name!r} is not one of {list(OPTIMIZERS)}")
    if not cfg.lr or cfg.lr <= 0:
        raise ConfigError(f"optim.lr: must be positive, got {cfg.lr!r}")
    if trainable_state is not None and not jax.tree.leaves(trainable_state):
        raise ConfigError("optim: the trainable partition is empty (nothing to optimise)")
    sched = lr_schedule(cfg, total_steps)
    wd = float(cfg.weight_decay or 0.0)
    if cfg.name == "adamw":
        opt = optax.adamw(
            sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=decay_mask
        )
    elif cfg.name == "adafactor":
        # Factored second moments: state ~ (rows + cols) per matrix instead of rows * cols.
        opt = optax.adafactor(
            learning_rate=sched,
            weight_decay_rate=wd or None,
            weight_decay_mask=decay_mask,
            multiply_by_parameter_scale=False,
        )
    elif cfg.name == "sgd":
        # Decoupled decay (scaled by the schedule like AdamW), momentum on the gradient only.
        parts = [optax.trace(decay=cfg.momentum)] if cfg.momentum else []
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
        opt = optax.chain(*parts, optax.scale_by_learning_rate(sched))
    else:
        opt = optax.lion(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=decay_mask)
    if cfg.grad_clip:
        opt = optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip)), opt)
    return opt


def state_bytes(opt_state) -> int:
    """Bytes held by an optimizer state (arrays or ``ShapeDtypeStruct`` leaves)."""
    total = 0
    for x in jax.tree.leaves(opt_state):
        if hasattr(x, "dtype") and hasattr(x, "shape"):
            total += int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
    return total


def tree_bytes(tree) -> int:
    """Bytes of the array leaves of any pytree (e.g. the trainable partition)."""
    return state_bytes(tree)
