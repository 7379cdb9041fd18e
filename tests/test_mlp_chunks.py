"""model.mlp_chunks: the MLP over blocks of tokens gives the same values and gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune import quant
from jaxtune.config import PeftConfig
from jaxtune.models import init_model
from jaxtune.models.bert import BertConfig
from jaxtune.models.gemma import GemmaConfig
from jaxtune.models.gpt2 import GPT2Config
from jaxtune.models.llama import LlamaConfig
from jaxtune.peft import apply_peft

CONFIGS = {"llama": LlamaConfig, "gemma": GemmaConfig, "gpt2": GPT2Config, "bert": BertConfig}
IDS = jnp.asarray(np.random.default_rng(0).integers(1, 100, size=(2, 7)), jnp.int32)


def _model(family, blocks, *, lora=False, fmt=None, **kw):
    model = init_model(CONFIGS[family].tiny(mlp_chunks=blocks, **kw), seed=0)
    quant.quantize_model(model, fmt)
    if lora:
        peft = PeftConfig(method="lora", rank=4, alpha=8, targets=["all-linear"])
        apply_peft(model, peft, rngs=nnx.Rngs(1))
        # Non-zero B factors, so the LoRA path moves the output and gets gradients.
        for _, m in nnx.iter_modules(model):
            if getattr(m, "lora_b", None) is not None:
                m.lora_b.set_value(jnp.full(m.lora_b.shape, 0.05, m.lora_b.dtype))
    return model


def _value_and_grads(model, wrt=nnx.Param):
    graphdef, params, rest = nnx.split(model, wrt, ...)
    w = jax.random.normal(jax.random.key(2), model(IDS).shape)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(IDS) * w)

    return loss(params), jax.grad(loss)(params)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_blocked_mlp_equals_one_pass(family):
    # 14 tokens in 3 blocks: the last block is padded with a zero row.
    one, blocked = _model(family, 1), _model(family, 3)
    np.testing.assert_allclose(blocked(IDS), one(IDS), atol=1e-5)
    (v1, g1), (v3, g3) = _value_and_grads(one), _value_and_grads(blocked)
    np.testing.assert_allclose(v3, v1, rtol=1e-5)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g3), strict=True):
        np.testing.assert_allclose(b.get_value(), a.get_value(), atol=2e-5, err_msg=str(path))


def test_blocked_mlp_with_lora_on_an_nf4_base():
    one = _model("llama", 1, lora=True, fmt="nf4")
    blocked = _model("llama", 4, lora=True, fmt="nf4")
    (v1, g1), (v4, g4) = (_value_and_grads(m, nnx.LoRAParam) for m in (one, blocked))
    np.testing.assert_allclose(v4, v1, rtol=1e-5)
    flat1, flat4 = nnx.to_flat_state(g1), nnx.to_flat_state(g4)
    assert len(flat1) > 0
    for (path, a), (_, b) in zip(flat1, flat4, strict=True):
        np.testing.assert_allclose(b.get_value(), a.get_value(), atol=2e-5, err_msg=str(path))


def test_blocks_bound_the_mlp_activations():
    # The [tokens, ffn] float arrays of the gradient are [block, ffn] with blocks; the
    # check first has to see the full-size ones without. ([64, 96] is a kernel.)
    def shapes(blocks):
        model = _model("llama", blocks, intermediate_size=96, num_layers=1)
        graphdef, params = nnx.split(model)

        def loss(p):
            return jnp.sum(nnx.merge(graphdef, p)(IDS))

        hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
        return set(re.findall(r"f32\[(\d+),96\]", hlo))

    assert "14" in shapes(1)
    blocked = shapes(4)  # 14 tokens -> 4 blocks of 4 rows (2 padding rows)
    assert "4" in blocked and not blocked & {"14", "16"}, blocked


def test_config_checks_the_block_count():
    from jaxtune.config import config_from_dict
    from jaxtune.errors import ConfigError

    base = {"train": {"steps": 1}, "peft": {"method": "full"}}
    assert config_from_dict({**base, "model": {"path": "x", "mlp_chunks": 4}}).model.mlp_chunks == 4
    with pytest.raises(ConfigError, match="model.mlp_chunks"):
        config_from_dict({**base, "model": {"path": "x", "mlp_chunks": 0}})
