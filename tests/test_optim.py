"""Optimizers, schedules, weight-decay masks and clipping."""

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
from jaxtune.optim import build_optimizer, decay_mask, lr_schedule, state_bytes, tree_bytes


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
