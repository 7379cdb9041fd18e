"""Optimizers, schedules, weight-decay masks and clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtune.config import OptimConfig
from jaxtune.errors import ConfigError
from jaxtune.models import init_model
from jaxtune.models.llama import LlamaConfig
from jaxtune.optim import (
    build_optimizer,
    decay_mask,
    lr_schedule,
    state_bytes,
    tree_bytes,
    warmup_steps,
)


def lrs(total, **kw):
    sched = lr_schedule(OptimConfig(lr=1.0, **kw), total)
    return np.array([float(sched(s)) for s in range(total + 1)])


def test_schedules():
    c = lrs(10, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    np.testing.assert_allclose(c[:3], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(c[6], 0.1 + 0.9 * 0.5, atol=1e-6)  # halfway through decay
    np.testing.assert_allclose(c[10], 0.1, atol=1e-6)
    assert np.all(np.diff(c[2:]) <= 1e-7)
    lin = lrs(10, schedule="linear", warmup_ratio=0.2)
    np.testing.assert_allclose(lin[[0, 1, 2, 6, 10]], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(lrs(5, schedule="constant", warmup_steps=0), 1.0)
    np.testing.assert_allclose(lrs(8, schedule="cosine")[0], 1.0)  # no warmup: peak first
    with pytest.raises(ConfigError, match="optim.schedule"):
        lr_schedule(OptimConfig(schedule="step"), 10)


def reference_lr(kind, peak, floor_ratio, warm, total, step):
    """The hand-written schedule ``lr_schedule`` computed before it was built from optax
    (float64): linear warmup ``peak * step / warm``, then constant / linear / cosine decay
    to ``peak * floor_ratio`` over ``max(total - warm, 1)`` steps, clamped there."""
    floor = peak * floor_ratio
    if step < warm:
        return peak * step / max(warm, 1)
    t = min(max((step - warm) / max(total - warm, 1), 0.0), 1.0)
    if kind == "constant":
        return peak
    if kind == "linear":
        return peak + (floor - peak) * t
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


# (warmup config, total steps, min_lr_ratio, resolved warmup length)
SCHEDULE_CASES = [
    ({}, 10, 0.0, 0),
    ({}, 1, 0.3, 0),
    ({"warmup_steps": 2}, 10, 0.1, 2),
    ({"warmup_steps": 1}, 1, 0.0, 1),
    ({"warmup_steps": 5}, 7, 0.5, 5),
    ({"warmup_steps": 10}, 10, 0.2, 10),  # warmup == total
    ({"warmup_steps": 12}, 10, 0.1, 12),  # warmup past total
    ({"warmup_ratio": 0.15}, 37, 0.05, 6),  # ceil(5.55)
    ({"warmup_ratio": 0.2}, 10, 0.0, 2),
    ({"warmup_steps": 3}, 100, 1.0, 3),
    ({"warmup_steps": 250}, 1000, 0.01, 250),
]


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup,total,ratio,warm", SCHEDULE_CASES)
def test_schedule_matches_the_hand_written_formula(kind, warmup, total, ratio, warm):
    peak = 3e-4
    cfg = OptimConfig(lr=peak, schedule=kind, min_lr_ratio=ratio, **warmup)
    assert warmup_steps(cfg, total) == warm
    sched = lr_schedule(cfg, total)
    steps = range(total + 4)
    got = np.array([float(sched(s)) for s in steps])
    jitted = np.array([float(jax.jit(sched)(jnp.int32(s))) for s in (0, warm, total + 3)])
    want = np.array([reference_lr(kind, peak, ratio, warm, total, s) for s in steps])
    # 1e-6 relative to the peak lr: float32 interpolation ``(end - start) * pct + start``
    # loses relative (not absolute) precision on the first warmup steps of a long warmup.
    tol = 1e-6 * peak
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    np.testing.assert_allclose(jitted, want[[0, warm, total + 3]], rtol=0, atol=tol)
    assert got[0] == (0.0 if warm else np.float32(peak))
    # The check is sharp enough to see a warmup that is one step off.
    for off in (warm - 1, warm + 1):
        if off >= 0 and off != warm:
            wrong = [reference_lr(kind, peak, ratio, off, total, s) for s in steps]
            assert np.max(np.abs(got - np.array(wrong))) > 100 * tol, off


def test_schedule_config_errors():
    with pytest.raises(ConfigError, match="optim.schedule"):
        lr_schedule(OptimConfig(schedule="step"), 10)
    with pytest.raises(ConfigError, match="train.steps"):
        lr_schedule(OptimConfig(), 0)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        lr_schedule(OptimConfig(min_lr_ratio=1.5), 10)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        lr_schedule(OptimConfig(min_lr_ratio=-0.1), 10)


def test_decay_mask_skips_norms_biases_embeddings_even_when_stacked():
    model = init_model(LlamaConfig.tiny(qkv_bias=True, tie_word_embeddings=False))
    mask = dict(nnx.to_flat_state(decay_mask(nnx.state(model, nnx.Param))))
    assert mask[("layers", "attn", "q_proj", "kernel")].get_value() is True
    assert mask[("lm_head", "kernel")].get_value() is True
    for path in [
        ("layers", "input_norm", "scale"),  # [L, D]: 2-D but a norm
        ("layers", "attn", "q_proj", "bias"),
        ("norm", "scale"),
        ("embed_tokens", "embedding"),
    ]:
        assert mask[path].get_value() is False, path


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd", "lion"])
def test_each_optimizer_decreases_a_quadratic(name):
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
    cfg = OptimConfig(name=name, lr=0.05, schedule="constant", weight_decay=0.01, grad_clip=None)
    opt = build_optimizer(cfg, 20, params)
    state = opt.init(params)

    def loss(p):
        return jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    start = float(loss(params))
    for _ in range(10):
        params, state = step(params, state)
    assert float(loss(params)) < start


def test_adam_state_is_two_copies_plus_counters():
    params = {"w": jnp.ones((8, 4)), "b": jnp.ones((4,))}
    opt = build_optimizer(OptimConfig(name="adamw", weight_decay=0.1), 10, params)
    extra = state_bytes(opt.init(params)) - 2 * tree_bytes(params)
    assert 0 <= extra <= 16  # step counters only
    sgd = build_optimizer(OptimConfig(name="sgd", momentum=0.0), 10, params)
    assert state_bytes(sgd.init(params)) <= 16


def test_grad_clip_by_global_norm():
    params = {"w": jnp.zeros((2,))}
    cfg = OptimConfig(name="sgd", lr=1.0, momentum=0.0, schedule="constant", grad_clip=1.0)
    opt = build_optimizer(cfg, 1, params)
    u, _ = opt.update({"w": jnp.array([30.0, 40.0])}, opt.init(params), params)
    np.testing.assert_allclose(np.asarray(u["w"]), [-0.6, -0.8], rtol=1e-6)


def test_bad_optimizer_config():
    with pytest.raises(ConfigError, match="optim.name: 'adam' is not one of"):
        build_optimizer(OptimConfig(name="adam"), 10)
    with pytest.raises(ConfigError, match="optim.lr"):
        build_optimizer(OptimConfig(lr=0.0), 10)
    with pytest.raises(ConfigError, match="trainable partition is empty"):
        build_optimizer(OptimConfig(), 10, {})
