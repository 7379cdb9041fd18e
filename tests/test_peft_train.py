"""Training through the trainable filter: frozen params stay bit-identical, state is small."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import changed_paths, flat_np, train

from jaxtune.config import PeftConfig
from jaxtune.errors import ConfigError
from jaxtune.models import init_model
from jaxtune.models.llama import Linear, LlamaConfig
from jaxtune.optim import state_bytes, tree_bytes
from jaxtune.peft import AdapterParam, apply_peft, summary, trainable_filter

IDS = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 12)))


@pytest.mark.parametrize(
    "peft",
    [
        PeftConfig(method="lora", rank=4, alpha=8.0, targets=("all-linear",)),
        PeftConfig(method="dora", rank=4, alpha=8.0, targets=("q_proj", "down_proj")),
        PeftConfig(method="adapter", adapter_size=8),
    ],
    ids=["lora", "dora", "adapter"],
)
def test_frozen_params_bit_identical_and_state_only_for_trainable(peft):
    model = init_model(LlamaConfig.tiny())
    apply_peft(model, peft, nnx.Rngs(0))
    full_before = flat_np(nnx.state(model))
    (tr0, frozen0), trainable, opt_state = train(model, peft)
    # Write the trained partition back, as the trainer does: every other parameter of
    # the model is still bit-identical.
    nnx.update(model, trainable)
    after = flat_np(nnx.state(model))
    for path in frozen0:
        assert np.array_equal(after[path], full_before[path]), path
    # Trainable: the method's own type only, and all of it moved. (With a zero-init up/B,
    # 3 steps are enough for every factor to change.)
    kind = AdapterParam if peft.method == "adapter" else nnx.LoRAParam
    types = {type(v) for _, v in nnx.to_flat_state(trainable)}
    assert types == {kind}
    assert changed_paths(tr0, trainable) == set(flat_np(trainable))
    # Adam state = mu + nu for trainable leaves only, plus step counters.
    extra = state_bytes(opt_state) - 2 * tree_bytes(trainable)
    assert 0 <= extra <= 16
    s = summary(model, trainable_filter(model, peft))
    assert s["trainable_bytes"] == tree_bytes(trainable) and s["percent"] < 50


@pytest.mark.parametrize("method", ["lora", "dora", "adapter"])
def test_bfloat16_adapters_train_with_bfloat16_optimizer_state(method):
    # peft.dtype=bfloat16 (torchtune's choice): factors, their gradients and AdamW's
    # mu / nu are all bf16, half the bytes of float32; the base stays as it is.
    model = init_model(LlamaConfig.tiny(), dtype=jnp.bfloat16)
    kw = dict(adapter_size=8) if method == "adapter" else dict(rank=4, alpha=8.0)
    peft = PeftConfig(method=method, targets=("all-linear",), dtype="bfloat16", **kw)
    apply_peft(model, peft, nnx.Rngs(0))
    (tr0, _), trainable, opt_state = train(model, peft, steps=4)
    leaves = jax.tree.leaves(trainable)
    assert leaves and {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    assert changed_paths(tr0, trainable) == set(flat_np(trainable))
    moments = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    assert {x.dtype for x in moments} == {jnp.dtype(jnp.bfloat16)}
    assert 0 <= state_bytes(opt_state) - 2 * tree_bytes(trainable) <= 16
    f32 = init_model(LlamaConfig.tiny(), dtype=jnp.bfloat16)
    apply_peft(f32, dataclasses.replace(peft, dtype="float32"), nnx.Rngs(0))
    f32_bytes = tree_bytes(nnx.state(f32, trainable_filter(f32, peft)))
    assert 2 * tree_bytes(trainable) == f32_bytes


def test_lora_plus_unfrozen_norms_changes_exactly_factors_and_norm_scales():
    model = init_model(LlamaConfig.tiny())
    peft = PeftConfig(
        method="lora", rank=2, alpha=4.0, targets=("q_proj", "v_proj"), unfreeze=("norms",)
    )
    apply_peft(model, peft, nnx.Rngs(0))
    full_before = flat_np(nnx.state(model))
    (tr0, frozen0), trainable, _ = train(model, peft)
    changed = changed_paths(tr0, trainable)
    expected_norms = {
        ("layers", "input_norm", "scale"),
        ("layers", "post_attn_norm", "scale"),
        ("norm", "scale"),
    }
    lora = {p for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert changed == lora | expected_norms
    nnx.update(model, trainable)
    after = flat_np(nnx.state(model))
    assert {p for p in after if not np.array_equal(after[p], full_before[p])} == changed


def test_unfreeze_groups_regex_and_top_layers():
    model = init_model(
        LlamaConfig.tiny(scan_layers=False, qkv_bias=True, tie_word_embeddings=False)
    )
    apply_peft(model, PeftConfig(method="lora", rank=2, alpha=2.0), nnx.Rngs(0))

    def selected(**kw):
        filt = trainable_filter(model, PeftConfig(method="lora", **kw))
        return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, filt))}

    lora = selected()
    assert all("lora_" in p for p in lora)
    assert selected(unfreeze=("biases",)) - lora == {
        f"layers/{i}/attn/{x}_proj/bias" for i in range(2) for x in "qkv"
    }
    assert selected(unfreeze=("lm_head",)) - lora == {"lm_head/kernel"}
    assert selected(unfreeze=("embeddings",)) - lora == {"embed_tokens/embedding"}
    assert selected(unfreeze=(r"mlp/down_proj/kernel$",)) - lora == {
        "layers/0/mlp/down_proj/kernel",
        "layers/1/mlp/down_proj/kernel",
    }
    top = selected(unfreeze_top_layers=1) - lora
    assert top and all(p.startswith("layers/1/") for p in top)
    assert "layers/1/attn/q_proj/lora_a" in lora  # LoRA params stay selected too
    with pytest.raises(ConfigError, match="peft.unfreeze: 'gamma' matches no parameter"):
        selected(unfreeze=("gamma",))


def test_unfreeze_top_layers_needs_unscanned_model():
    model = init_model(LlamaConfig.tiny())
    with pytest.raises(ConfigError, match="scan_layers=False"):
        trainable_filter(model, PeftConfig(method="full", unfreeze_top_layers=1))


def test_full_and_feature_filters():
    model = init_model(LlamaConfig.tiny(tie_word_embeddings=True))
    full = nnx.state(model, trainable_filter(model, PeftConfig(method="full")))
    assert len(nnx.to_flat_state(full)) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    # Tied model: lm_head means the embedding matrix.
    lm = trainable_filter(model, PeftConfig(method="full", unfreeze=("lm_head",)))
    assert lm(("embed_tokens", "embedding"), model.embed_tokens.embedding)
    with pytest.raises(ConfigError, match="nothing to train"):
        trainable_filter(model, PeftConfig(method="feature"))
    model.head = nnx.data(Linear(64, 3, ("embed", None), rngs=nnx.Rngs(0)))
    feat = nnx.to_flat_state(
        nnx.state(model, trainable_filter(model, PeftConfig(method="feature")))
    )
    assert [p for p, _ in feat] == [("head", "kernel")]
    with pytest.raises(ConfigError, match="nothing to train"):
        trainable_filter(init_model(LlamaConfig.tiny()), PeftConfig(method="lora"))


def test_dropout_key_reaches_adapters():
    model = init_model(LlamaConfig.tiny())
    apply_peft(model, PeftConfig(method="adapter", adapter_size=8, dropout=0.5), nnx.Rngs(0))
    for slot in ("attn_adapter", "mlp_adapter"):
        ad = getattr(model.layers, slot)
        ad.up.set_value(0.1 * jax.random.normal(jax.random.key(1), ad.up.shape))
    a = np.asarray(model(IDS))
    b = np.asarray(model(IDS, rng=jax.random.key(0)))
    assert not np.allclose(a, b)
