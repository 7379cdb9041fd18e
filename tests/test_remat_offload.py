"""``model.remat: offload``: full remat with each layer's saved input in host memory."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune.config import config_from_dict
from jaxtune.errors import ConfigError
from jaxtune.models import init_model
from jaxtune.models.bert import BertConfig
from jaxtune.models.gemma import GemmaConfig
from jaxtune.models.gpt2 import GPT2Config
from jaxtune.models.llama import LlamaConfig

CONFIGS = {"llama": LlamaConfig, "gemma": GemmaConfig, "gpt2": GPT2Config, "bert": BertConfig}
IDS = jnp.asarray(np.random.default_rng(0).integers(1, 100, size=(2, 9)), jnp.int32)


def _value_and_grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    w = jax.random.normal(jax.random.key(2), model(IDS).shape)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(IDS) * w)

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("family,scan", [(f, True) for f in sorted(CONFIGS)] + [("llama", False)])
def test_offload_computes_what_full_remat_computes(family, scan):
    # The same function and gradients as full remat and as no remat (on the CPU the
    # host is the device; what offload changes is where the saved inputs live).
    def run(remat):
        cfg = CONFIGS[family].tiny(scan_layers=scan, remat=remat)
        return _value_and_grads(init_model(cfg, seed=0))

    off = run("offload")
    for remat, atol in (("full", 1e-6), ("none", 2e-5)):  # recomputation reorders sums
        ref = run(remat)
        np.testing.assert_allclose(off[0], ref[0], rtol=1e-6)
        flat_ref, flat_off = nnx.to_flat_state(ref[1]), nnx.to_flat_state(off[1])
        assert len(flat_ref) == len(flat_off) > 0
        for (path, a), (_, b) in zip(flat_ref, flat_off, strict=True):
            np.testing.assert_allclose(
                b.get_value(), a.get_value(), rtol=1e-5, atol=atol, err_msg=str(path)
            )


def test_config_accepts_offload_only_among_the_policies():
    rest = {"train": {"steps": 1}, "peft": {"method": "full"}}
    assert config_from_dict({"model": {"remat": "offload"}, **rest}).model.remat == "offload"
    with pytest.raises(ConfigError, match="model.remat"):
        config_from_dict({"model": {"remat": "host"}, **rest})


# About a minute of libtpu compilation: `make test-heavy` (not CI's `make test`).
@pytest.mark.heavy
@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="compiling for a TPU needs libtpu"
)
def test_offload_moves_the_layer_inputs_to_host_memory_on_a_tpu():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxtune.train.plan import topology_devices

    sharding = NamedSharding(Mesh(np.array(topology_devices("v5e:1x1")), ("d",)), PartitionSpec())
    layers, batch, tokens, hidden = 16, 4, 2048, 1024

    def memory(remat):
        cfg = LlamaConfig.tiny(
            hidden_size=hidden,
            intermediate_size=1024,
            num_layers=layers,
            num_heads=8,
            num_kv_heads=4,
            head_dim=128,
            max_position_embeddings=tokens,
            remat=remat,
        )
        graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(cfg)))

        def loss(p, ids):
            return jnp.mean(nnx.merge(graphdef, p)(ids) ** 2)

        args = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
            (params, jax.ShapeDtypeStruct((batch, tokens), jnp.int32)),
        )
        return jax.jit(jax.grad(loss)).lower(*args).compile().memory_analysis()

    full, off = memory("full"), memory("offload")
    inputs = layers * batch * tokens * hidden * 4  # what full remat keeps: float32 [B, T, D]
    assert full.host_temp_size_in_bytes == 0
    assert off.host_temp_size_in_bytes >= inputs
    assert off.temp_size_in_bytes <= full.temp_size_in_bytes - inputs // 2
