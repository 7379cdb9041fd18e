"""LoRA / DoRA / bottleneck adapters: identity at init, merge, structure, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import perturb

from jaxtune.config import PeftConfig
from jaxtune.errors import ConfigError
from jaxtune.export.peft import save_peft_adapter
from jaxtune.models import init_model
from jaxtune.models.llama import LlamaConfig
from jaxtune.peft import (
    AdapterParam,
    abstract_peft_model,
    apply_peft,
    has_lora,
    lora_linears,
    merge,
    merged_copy,
    summary,
    trainable_filter,
)
from jaxtune.verify import numpy_logits

IDS = np.random.RandomState(0).randint(0, 256, (2, 12))
SCAN = pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])


def tiny(scan=True, **kw):
    return init_model(LlamaConfig.tiny(scan_layers=scan, **kw), seed=0)


@pytest.mark.parametrize(
    "scan, peft",
    [
        (True, dict(method="lora", targets=("all-linear",))),
        (False, dict(method="lora", targets=("q_proj", "v_proj"), rslora=True)),
        (True, dict(method="dora", targets=("all-linear",))),
        (False, dict(method="dora", targets=("all-linear",))),
        (True, dict(method="adapter", adapter_placement="houlsby")),
        (False, dict(method="adapter", adapter_placement="pfeiffer", adapter_activation="relu")),
    ],
    ids=["lora-scan", "rslora-loop", "dora-scan", "dora-loop", "houlsby-scan", "pfeiffer-loop"],
)
def test_identity_at_init(scan, peft):
    model = tiny(scan)
    base = numpy_logits(model, IDS)
    apply_peft(model, PeftConfig(rank=4, alpha=8.0, **peft), nnx.Rngs(3))
    out = numpy_logits(model, IDS)
    if peft["method"] == "dora":
        # m / ||W|| is 1 up to one rounding of the norm (eager init vs fused forward).
        assert np.abs(out - base).max() <= 1e-6
    elif jax.default_backend() == "cpu":
        assert np.array_equal(out, base)
    else:
        # GPU kernels for a different graph may reduce in another order: exact up to ulps.
        assert np.abs(out - base).max() <= 1e-6


@SCAN
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_equals_unmerged(scan, method):
    model = tiny(scan, tie_word_embeddings=False)
    targets = ("all-linear", "lm_head")
    apply_peft(model, PeftConfig(method=method, rank=3, alpha=6.0, targets=targets), nnx.Rngs(0))
    perturb(model)
    kernels = {p: np.asarray(lin.kernel[...]) for p, lin in lora_linears(model)}
    unmerged = numpy_logits(model, IDS)
    merged = merge(model)
    assert not has_lora(merged) and has_lora(model)  # pure: the input keeps its factors
    assert np.abs(numpy_logits(merged, IDS) - unmerged).max() <= 1e-5
    assert np.array_equal(numpy_logits(model, IDS), unmerged)
    by_path = dict(nnx.iter_modules(merged))
    for path, lin in lora_linears(model):
        assert np.array_equal(np.asarray(lin.kernel[...]), kernels[path])
        if method == "lora":
            delta = np.asarray(by_path[path].kernel[...]) - kernels[path]
            for mat in delta.reshape(-1, *delta.shape[-2:]):
                assert np.linalg.matrix_rank(mat, tol=1e-5) <= 3
    assert merged_copy(merged) is merged  # nothing left to merge


def test_factor_shapes_axes_and_scale():
    model = tiny(True)
    apply_peft(
        model,
        PeftConfig(method="dora", rank=4, alpha=16.0, rslora=True, targets=("all-linear",)),
        nnx.Rngs(0),
    )
    q = model.layers.attn.q_proj
    assert q.lora_a.shape == (2, 64, 4) and q.lora_b.shape == (2, 4, 64)
    assert q.lora_a.get_metadata()["axes"] == ("layers", "embed", "lora_rank")
    assert q.lora_b.get_metadata()["axes"] == ("layers", "lora_rank", "heads")
    assert q.dora_m.get_metadata()["axes"] == ("layers", "heads")
    assert q.lora_scale == pytest.approx(16.0 / 2.0)  # rsLoRA: alpha / sqrt(r)
    d = model.layers.mlp.down_proj
    assert d.lora_a.get_metadata()["axes"] == ("layers", "mlp", "lora_rank")
    np.testing.assert_allclose(
        np.asarray(d.dora_m[...]), np.linalg.norm(np.asarray(d.kernel[...]), axis=1), rtol=1e-6
    )
    # kaiming-uniform A (bound 1/sqrt(in)), B zero; base paths unchanged.
    assert np.abs(np.asarray(q.lora_a[...])).max() <= 1 / np.sqrt(64)
    assert not np.asarray(q.lora_b[...]).any()
    paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert ("layers", "attn", "q_proj", "kernel") in paths
    assert len(lora_linears(model)) == 7


def test_adapters_are_their_own_collection():
    model = tiny(True)
    apply_peft(model, PeftConfig(method="adapter", adapter_size=8), nnx.Rngs(0))
    _, adapters, lora, rest = nnx.split(model, AdapterParam, nnx.LoRAParam, ...)
    flat = dict(nnx.to_flat_state(adapters))
    assert ("layers", "attn_adapter", "down") in flat and ("layers", "mlp_adapter", "up") in flat
    assert flat[("layers", "mlp_adapter", "down")].shape == (2, 64, 8)
    assert not jax.tree.leaves(lora)
    assert not any(isinstance(v, AdapterParam) for _, v in nnx.to_flat_state(rest))
    # Default width = hidden // reduction.
    m2 = tiny(False)
    apply_peft(m2, PeftConfig(method="adapter", adapter_placement="pfeiffer"), nnx.Rngs(0))
    assert m2.layers[0].attn_adapter is None
    assert m2.layers[1].mlp_adapter.down.shape == (64, 4)


def test_target_patterns():
    def adapted(scan, targets):
        model = tiny(scan, tie_word_embeddings=False)
        apply_peft(model, PeftConfig(rank=2, alpha=2.0, targets=targets), nnx.Rngs(0))
        return sorted("/".join(map(str, p)) for p, _ in lora_linears(model))

    assert adapted(True, "q_proj, v_proj") == ["layers/attn/q_proj", "layers/attn/v_proj"]
    assert adapted(True, ("layers/mlp/(gate|up)_proj",)) == [
        "layers/mlp/gate_proj",
        "layers/mlp/up_proj",
    ]
    assert len(adapted(True, ("all-linear",))) == 7  # lm_head excluded
    assert adapted(False, ("layers/1/attn/o_proj",)) == ["layers/1/attn/o_proj"]
    assert adapted(True, ("lm_head",)) == ["lm_head"]


def test_lora_dropout_only_with_rng():
    model = tiny(True)
    apply_peft(model, PeftConfig(method="dora", rank=4, alpha=8.0, dropout=0.5), nnx.Rngs(0))
    perturb(model)
    ids = jnp.asarray(IDS)
    a = model(ids)
    assert np.array_equal(np.asarray(a), np.asarray(model(ids)))
    b = model(ids, rng=jax.random.key(0))
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_abstract_peft_model_has_no_memory():
    abstract = abstract_peft_model(LlamaConfig.tiny(), PeftConfig(method="lora", rank=2, alpha=4.0))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.LoRAParam))
    assert flat and all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for _, v in flat)
    s = summary(abstract, trainable_filter(abstract, PeftConfig(method="lora")))
    assert s["trainable"] == 2 * ((64 * 2 + 2 * 64) + (64 * 2 + 2 * 32))  # L * (q + v)


@pytest.mark.parametrize(
    "peft, match",
    [
        (dict(targets=("qq_proj",)), r"peft.targets: 'qq_proj' matches no linear layer"),
        (dict(targets=("layers/0/attn/q_proj",)), r"use scan_layers=False"),
        (dict(targets=("q_proj(",)), r"invalid regex"),
        (dict(rank=0), r"peft.rank: must be a positive integer, got 0"),
        (dict(rank=-2), r"peft.rank"),
        (dict(alpha=None), r"peft.alpha: required"),
        (dict(method="dora", alpha=None), r"peft.alpha: required"),
        (dict(method="adapter", adapter_activation="swish"), r"adapter_activation"),
        (dict(method="adapter", adapter_placement="middle"), r"adapter_placement"),
        (dict(method="prefix"), r"peft.method"),
    ],
)
def test_bad_peft_config_is_one_line_config_error(peft, match):
    model = tiny(True)
    kw = {"rank": 4, "alpha": 8.0, **peft}
    with pytest.raises(ConfigError, match=match) as e:
        apply_peft(model, PeftConfig(**kw), nnx.Rngs(0))
    assert "\n" not in str(e.value)


def test_adapter_method_cannot_export_to_peft_or_merge(tmp_path):
    model = tiny(True)
    apply_peft(model, PeftConfig(method="adapter"), nnx.Rngs(0))
    with pytest.raises(ConfigError, match="no PEFT/Hugging Face format.*jaxtune checkpoint"):
        save_peft_adapter(model, tmp_path / "out", "base")
    with pytest.raises(ConfigError, match="cannot be merged"):
        merged_copy(model)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_dropout_mask_statistics(rate):
    from jaxtune.models.layers import dropout

    x = jnp.ones((4, 128, 256), jnp.float32)
    y = np.asarray(dropout(x, rate, jax.random.key(3)))
    keep = y != 0
    # Binomial(131072, 1 - rate): 5 standard deviations.
    sd = np.sqrt(rate * (1 - rate) / keep.size)
    assert abs((1 - keep.mean()) - rate) < 5 * sd
    np.testing.assert_allclose(np.unique(y[keep]), [1 / (1 - rate)], rtol=1e-6)
    k = keep.astype(np.float64)
    for a, b in [(k[..., 1:], k[..., :-1]), (k[:, 1:], k[:, :-1]), (k[1:], k[:-1])]:
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02  # neighbours independent
    other = np.asarray(dropout(x, rate, jax.random.key(4))) != 0
    assert abs(np.corrcoef(k.ravel(), other.ravel())[0, 1]) < 0.02  # keys independent
    again = np.asarray(dropout(x, rate, jax.random.key(3)))
    assert np.array_equal(y, again)
    assert dropout(x, rate, None) is x and dropout(x, 0.0, jax.random.key(3)) is x


def test_dropout_mask_does_not_depend_on_sharding():
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxtune.models.layers import dropout

    mesh = jax.make_mesh((2, 4), ("a", "b"))
    x = jnp.arange(8 * 16 * 32, dtype=jnp.float32).reshape(8, 16, 32) + 1
    whole = np.asarray(jax.jit(lambda v, k: dropout(v, 0.3, k))(x, jax.random.key(7)))
    spec = NamedSharding(mesh, PartitionSpec("a", None, "b"))
    fn = jax.jit(lambda v, k: dropout(v, 0.3, k), in_shardings=(spec, None), out_shardings=spec)
    sharded = fn(jax.device_put(x, spec), jax.random.key(7))
    assert np.array_equal(np.asarray(sharded), whole)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_fused_lora_backward_equals_autodiff_with_and_without_dropout(rate):
    # Linear's LoRA path (custom backward, 2-D token-major operands) against autodiff of
    # the plain formula on [B, T, in] inputs, with the same dropout mask.
    from jaxtune.models.layers import Linear, dropout

    lin = Linear(24, 40, ("embed", "mlp"), use_bias=True, rngs=nnx.Rngs(0))
    lin.lora_a = nnx.LoRAParam(jax.random.normal(jax.random.key(1), (24, 4)))
    lin.lora_b = nnx.LoRAParam(jax.random.normal(jax.random.key(2), (4, 40)))
    lin.lora_scale = 2.0
    lin.lora_dropout = rate
    assert lin._fused_lora()
    x = jax.random.normal(jax.random.key(4), (3, 5, 24))
    w = jax.random.normal(jax.random.key(5), (3, 5, 40))
    key = jax.random.key(6)

    def fused(lin, x):
        return jnp.sum(lin(x, key) * w)

    def plain(x, kernel, a, b):
        xd = dropout(x.reshape(15, 24), rate, key).reshape(x.shape)
        y = x @ kernel + (xd @ a) @ b * lin.lora_scale + lin.bias[...]
        return jnp.sum(y * w)

    args = (x, lin.kernel[...], lin.lora_a[...], lin.lora_b[...])
    np.testing.assert_allclose(fused(lin, x), plain(*args), rtol=1e-5)
    dlin, dx = nnx.grad(fused, argnums=(0, 1))(lin, x)
    got = (dx, dlin.kernel[...], dlin.lora_a[...], dlin.lora_b[...])
    want = jax.grad(plain, argnums=(0, 1, 2, 3))(*args)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
