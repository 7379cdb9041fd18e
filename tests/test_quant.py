"""QLoRA-style quantized frozen base weights (``jaxtune.quant``): formats, models, training."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import make_train_step

import jaxtune
from jaxtune import quant
from jaxtune.cli import build_parser
from jaxtune.cli.plan import run as run_plan
from jaxtune.config import OptimConfig, PeftConfig, config_from_dict
from jaxtune.errors import ConfigError
from jaxtune.export.peft import export_adapter, export_merged
from jaxtune.hf.io import save_hf
from jaxtune.models import init_model, quantized
from jaxtune.models.llama import LlamaConfig
from jaxtune.models.losses import token_loss_sums
from jaxtune.optim import build_optimizer, state_bytes, tree_bytes
from jaxtune.peft import apply_peft, trainable_filter
from jaxtune.sharding import make_mesh, shard_model, state_shardings, variable_sharding
from jaxtune.train import testing as T
from jaxtune.train.state import init_opt_state, jit_train_step, make_state, train_state_shardings
from jaxtune.train.tasks.lm import LM_BATCH
from jaxtune.verify import numpy_logits

IDS = np.random.RandomState(0).randint(0, 256, (2, 12))
SCAN = pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
LORA = PeftConfig(method="lora", rank=4, alpha=8.0, targets=("all-linear",))
# QLoRA paper, Appendix E / bitsandbytes ``get_4bit_type("nf4")``.
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def tiny(scan=True, fmt="nf4", **kw):
    model = init_model(LlamaConfig.tiny(scan_layers=scan, **kw), seed=0)
    return quant.quantize_model(model, fmt)


def flat_np(state):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def rel_err(got, ref):
    return float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2)))


# -------------------------------------------------------------------------- formats


def test_nf4_codebook_is_the_published_table():
    np.testing.assert_array_equal(quantized.NF4_CODEBOOK, np.asarray(PUBLISHED_NF4, np.float32))
    # Every level is its own nearest level: quantizing the table gives 0..15.
    w = np.tile(np.asarray(PUBLISHED_NF4, np.float32)[:, None], (4, 1))  # [64, 1]
    codes, scales = quantized.quantize(w, "nf4")
    assert scales.tolist() == [[1.0]]
    # One block of 64 rows: byte r holds row r (high nibble) and row 32 + r (low).
    hi, lo = codes[:, 0] >> 4, codes[:, 0] & 0xF
    np.testing.assert_array_equal(np.concatenate([hi, lo]), np.tile(np.arange(16), 4))


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_round_trip_error_bounds_and_sizes(fmt):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 256, 48)).astype(np.float32)  # [lead, in, out]
    w[0, :64, 0] = 0.0  # an all-zero block
    codes, scales = quantized.quantize(w, fmt)
    n = w.size
    assert scales.shape == (3, 256 // 64, 48) and scales.dtype == jnp.bfloat16
    if fmt == "nf4":
        assert codes.shape == (3, 128, 48) and codes.dtype == np.uint8
        assert codes.nbytes == n // 2
    else:
        assert codes.shape == w.shape and codes.dtype == np.int8 and codes.nbytes == n
    assert scales.nbytes == n // 64 * 2
    back = np.asarray(quantized.dequantize(codes, scales, fmt))
    assert back.shape == w.shape
    absmax = np.abs(w.reshape(3, 4, 64, 48)).max(axis=2, keepdims=True)
    err = np.abs(back - w).reshape(3, 4, 64, 48)
    # Worst case: half a step of the grid. int8: absmax / 127 / 2. nf4: half the widest
    # gap between levels, (0.6961928 - (-1)) / 2 of absmax (the table is asymmetric).
    # Plus the bfloat16 rounding of the scale (2^-9 relative), which can also clip the
    # largest value by as much.
    half_step = 0.5 / 127 if fmt == "int8" else float(np.diff(PUBLISHED_NF4).max()) / 2
    assert np.all(err <= absmax * (half_step + 2.0**-8) + 1e-7)
    assert np.all(back[0, :64, 0] == 0.0)
    # The block's absmax itself is exact up to the scale's bfloat16 rounding; typical
    # relative error of a Gaussian weight.
    i = np.argmax(np.abs(w[1, :64, 3]))
    assert back[1, i, 3] == pytest.approx(w[1, i, 3], rel=2.0**-8)
    assert rel_err(back, w) < (0.01 if fmt == "int8" else 0.11)
    # Same result in any compute dtype up to its rounding; jit-able.
    bf = jax.jit(quantized.dequantize, static_argnums=(2, 3))(codes, scales, fmt, jnp.bfloat16)
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf, np.float32), back, rtol=1e-2, atol=1e-6)


def test_block_size_and_shape_errors():
    assert quantized.block_size(4096) == 64 and quantized.block_size(96) == 32
    codes, scales = quantized.quantize(np.ones((96, 4)), "nf4")
    assert codes.shape == (48, 4) and scales.shape == (3, 4)
    with pytest.raises(ConfigError, match="odd"):
        quantized.quantize(np.ones((7, 4)), "nf4")
    with pytest.raises(ConfigError, match="int8"):
        quantized.quantize(np.ones((8, 4)), "int4")


def test_qmatmul_gradient_matches_dense_and_saves_no_kernel():
    rng = np.random.default_rng(1)
    codes, scales = quantized.quantize(rng.standard_normal((64, 32)), "nf4")
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    w = quantized.dequantize(codes, scales, "nf4")

    def loss_q(x):
        return jnp.sum(jnp.sin(quantized.qmatmul(x, codes, scales, "nf4")))

    g = jax.grad(loss_q)(x)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.sin(x @ w)))(x)
    # nf4 sums two half-kernel matmuls: float32 rounding differs from one dot.
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=5e-5)
    np.testing.assert_allclose(
        quantized.qmatmul(x, codes, scales, "nf4"), x @ w, rtol=1e-5, atol=1e-5
    )
    # The forward keeps only codes + scales (+ what sin needs), never the float kernel.
    _, vjp = jax.vjp(loss_q, x)
    residuals = [r for r in jax.tree.leaves(vjp) if hasattr(r, "shape")]
    assert not any(r.shape == (64, 32) and r.dtype == jnp.float32 for r in residuals)


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="compiling for a TPU needs libtpu"
)
@pytest.mark.parametrize("fmt,most", [("nf4", 0.25), ("int8", 1.1)])
def test_qmatmul_on_tpu_needs_no_float32_kernel(fmt, most):
    # Llama 3.1 8B's up_proj at 2 x 2048 tokens, compiled for a TPU v5e: forward and
    # backward of one quantized matmul. Broadcasting the block scales against [nb, B, out]
    # blocks made the TPU compiler write them out as a float32 array the size of the
    # kernel (224 MiB here, 112 MiB per nf4 half); repeated per row they fuse into the
    # dequantization. Budget: nf4 a quarter of the bf16 kernel (measured: 0 MiB, the
    # half-kernels stay in on-chip memory), int8 1.1 bf16 kernels (measured: 112 MiB).
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxtune.train.plan import topology_devices

    devices = topology_devices("v5e:1x1")
    sharding = NamedSharding(Mesh(np.array(devices), ("d",)), PartitionSpec())
    tokens, d_in, d_out = 4096, 4096, 14336
    codes_shape, codes_dtype, scales_shape, scales_dtype = quantized.quantized_shapes(
        (d_in, d_out), fmt
    )

    def step(x, codes, scales, g):
        _, vjp = jax.vjp(lambda x: quantized.qmatmul(x, codes, scales, fmt), x)
        return vjp(g)[0]

    shapes = [
        ((tokens, d_in), jnp.bfloat16),
        (codes_shape, codes_dtype),
        (scales_shape, scales_dtype),
        ((tokens, d_out), jnp.bfloat16),
    ]
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
    compiled = jax.jit(step).lower(*args).compile()
    bf16_kernel = d_in * d_out * 2
    assert compiled.memory_analysis().temp_size_in_bytes <= most * bf16_kernel


# --------------------------------------------------------------------------- models


def test_quantized_model_is_close_to_the_dense_model():
    dense = init_model(LlamaConfig.tiny(num_layers=1), seed=0)
    ref = numpy_logits(dense, IDS)
    n_lin = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3  # one layer's linear weights
    for fmt in ("int8", "nf4"):
        model = quant.quantize_model(nnx.clone(dense), fmt)
        got = numpy_logits(model, IDS)
        # Weight error ~1% (int8) / ~10% (nf4) RMS relative (see the round trip test);
        # this small model's logits move by no more than that.
        assert 0 < rel_err(got, ref) < (0.02 if fmt == "int8" else 0.2)
        assert quant.quant_format(model) == fmt
        stats = quant.quantized_stats(model)
        assert stats["params"] == n_lin
        assert stats["bytes"] == n_lin * (1 if fmt == "int8" else 0.5) + n_lin // 64 * 2
    # Structure: quantized storage is not a Param and keeps logical axes; embeddings and
    # the LM head stay dense Params.
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    q = ("layers", "mlp", "up_proj", "kernel")
    codes, scales = flat[(*q, "codes")], flat[(*q, "scales")]
    assert type(codes) is quantized.QuantWeight and not isinstance(codes, nnx.Param)
    assert codes.get_metadata()["axes"] == ("layers", "embed", "mlp")
    assert scales.get_metadata()["axes"] == ("layers", "embed", "mlp")
    assert isinstance(flat[("lm_head", "kernel")], nnx.Param)
    assert isinstance(flat[("embed_tokens", "embedding")], nnx.Param)
    assert model.layers.mlp.up_proj.kernel.shape == (1, 64, 128)
    # Dequantized copy: dense Params with the same values; the quantized model untouched.
    dq = quant.dequantize_model(model)
    assert isinstance(dq.layers.mlp.up_proj.kernel, nnx.Param)
    np.testing.assert_array_equal(
        dq.layers.mlp.up_proj.kernel[...], model.layers.mlp.up_proj.kernel.dequantize()
    )
    assert quant.quant_format(dq) is None and quant.quant_format(model) == "nf4"


@SCAN
def test_from_pretrained_quantizes_while_loading(tmp_path, scan):
    dense = init_model(LlamaConfig.tiny(num_layers=1), seed=0)
    save_hf(dense, tmp_path / "hf")
    loaded = jaxtune.from_pretrained(tmp_path / "hf", scan_layers=scan, quantize="nf4")
    expect = quant.quantize_model(jaxtune.from_pretrained(tmp_path / "hf", scan_layers=scan), "nf4")
    a, b = flat_np(nnx.state(loaded)), flat_np(nnx.state(expect))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    # Sharded load over FSDP-8: codes split along the input dim like the dense kernel,
    # the same values.
    mesh = make_mesh(1, 8, 1)
    sharded = jaxtune.from_pretrained(
        tmp_path / "hf", scan_layers=scan, quantize="nf4", sharding=variable_sharding(mesh)
    )
    q_proj = sharded.layers.attn.q_proj if scan else sharded.layers[0].attn.q_proj
    spec = q_proj.kernel.codes[...].sharding.spec
    assert spec == jax.sharding.PartitionSpec(*((None,) if scan else ()), "fsdp", None)
    c = flat_np(nnx.state(sharded))
    for k in a:
        np.testing.assert_array_equal(a[k], c[k], err_msg=str(k))
    with pytest.raises(ConfigError, match="model.quantize"):
        jaxtune.from_pretrained(tmp_path / "hf", quantize="fp4")


# ------------------------------------------------------------------------- training


def lm_loss(model, ids):
    logits = model(ids)[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def test_lora_on_quantized_base_is_identity_at_init():
    model = tiny(True, num_layers=1)
    base = numpy_logits(model, IDS)
    apply_peft(model, LORA, nnx.Rngs(0))
    np.testing.assert_array_equal(numpy_logits(model, IDS), base)  # B = 0 at init
    # DoRA: the magnitude starts at the column norms of the *dequantized* kernel.
    model = tiny(True, num_layers=1)
    dora = PeftConfig(method="dora", rank=4, alpha=8.0, targets=("q_proj", "down_proj"))
    apply_peft(model, dora, nnx.Rngs(0))
    np.testing.assert_allclose(numpy_logits(model, IDS), base, atol=1e-5)
    # Bottleneck adapters apply too; no method ever selects the quantized storage.
    adapter = PeftConfig(method="adapter", adapter_size=8)
    for m, p in ((model, dora), (apply_peft(tiny(True, num_layers=1), adapter), adapter)):
        flat = nnx.to_flat_state(nnx.state(m, trainable_filter(m, p)))
        assert flat and not any(type(v) is quantized.QuantWeight for _, v in flat)


def test_lora_training_on_unscanned_quantized_layers():
    model = tiny(False, num_layers=1)
    apply_peft(model, LORA, nnx.Rngs(0))
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(model, LORA), ...)
    frozen0 = flat_np(frozen)
    opt = build_optimizer(OptimConfig(lr=1e-2, schedule="constant"), 5, trainable)
    opt_state = opt.init(trainable)
    step = make_train_step(graphdef, opt, lm_loss)
    losses = []
    for _ in range(4):
        trainable, opt_state, loss = step(trainable, frozen, opt_state, jnp.asarray(IDS))
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.02, losses
    assert ("layers", 0, "mlp", "up_proj", "kernel", "codes") in frozen0
    for p, v in flat_np(frozen).items():
        np.testing.assert_array_equal(v, frozen0[p], err_msg=str(p))


def test_full_fine_tuning_of_a_quantized_model_is_a_config_error():
    with pytest.raises(ConfigError, match="model.quantize"):
        config_from_dict(
            {"model": {"quantize": "nf4"}, "peft": {"method": "full"}, "train": {"steps": 1}}
        )
    with pytest.raises(ConfigError, match="quantized"):
        trainable_filter(tiny(), PeftConfig(method="full"))


def _batch(b, t, vocab):
    ids = np.random.default_rng(0).integers(0, vocab, (b, t)).astype(np.int32)
    ones = np.ones((b, t), np.int32)
    return {
        "input_ids": ids,
        "targets": np.roll(ids, -1, axis=1),
        "loss_weights": ones.astype(np.float32),
        "attention_mask": ones,
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "segment_ids": ones.copy(),
    }


def _train(mesh, steps=3):
    """The trainer's jitted step (AdamW) on a quantized LoRA model over ``mesh``."""
    from jaxtune.sharding import device_batch

    model = tiny(True, num_layers=1)
    apply_peft(model, LORA, nnx.Rngs(0))
    model = shard_model(model, mesh)
    graphdef, params, frozen = nnx.split(model, trainable_filter(model, LORA), ...)
    frozen0 = flat_np(frozen)
    tx = build_optimizer(OptimConfig(name="adamw", lr=1e-2, schedule="constant"), 10, params)
    opt_state = init_opt_state(tx, params, mesh)
    # Optimizer state: AdamW mu + nu of the LoRA factors only (+ counters).
    assert 0 <= state_bytes(opt_state) - 2 * tree_bytes(params) <= 16
    step = jit_train_step(
        graphdef,
        tx,
        train_state_shardings(params, opt_state, mesh),
        state_shardings(frozen, mesh),
        mesh,
        loss_sums=token_loss_sums,
        batch_ndims={k: 2 for k in LM_BATCH},
    )
    state = make_state(0, params, opt_state, 0, mesh)
    batch = device_batch(_batch(8, 16, 256), mesh)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    for p, v in flat_np(frozen).items():  # codes, scales, norms, embeddings: untouched
        np.testing.assert_array_equal(v, frozen0[p], err_msg=str(p))
    return flat_np(state["params"]), losses, frozen


def test_lora_training_single_device_and_fsdp8_agree():
    single, losses1, _ = _train(make_mesh(1, 1, 1, jax.devices()[:1]))
    assert losses1[-1] < losses1[0] - 0.02, losses1
    sharded, losses8, frozen = _train(make_mesh(1, 8, 1))
    # The quantized codes are split over the 8 devices along the input dim.
    codes = frozen["layers"]["mlp"]["up_proj"]["kernel"]["codes"][...]
    assert codes.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    for p in single:
        # AdamW normalises the update: reduction-order noise shows up at ~1e-5 of lr.
        np.testing.assert_allclose(sharded[p], single[p], rtol=1e-4, atol=2e-5, err_msg=str(p))


# ---------------------------------------------------------------------- plan, export


def test_plan_reports_smaller_arguments_with_quantized_base(tmp_path, capsys):
    cfg = T.write_config(
        tmp_path / "cfg.yaml",
        tmp_path / "not-downloaded",
        tmp_path / "train.jsonl",
        tmp_path / "run",
        model="{path: /nowhere/model, preset: tiny, dtype: bfloat16}",
        peft="{method: lora, rank: 4, alpha: 8, targets: [all-linear]}",
        optim="{name: sgd, lr: 0.1}",
        train="{steps: 10, batch_size: 1, seq_len: 8}",
    )
    parser = build_parser()
    sizes = {}
    for q in ("null", "nf4"):
        out = tmp_path / f"plan-{q}.json"
        argv = ["plan", str(cfg), f"model.quantize={q}", "--devices", "1", "--json", str(out)]
        assert run_plan(parser.parse_args(argv)) == 0
        sizes[q] = json.loads(out.read_text())
    assert "base kernels stored as nf4" in capsys.readouterr().out
    n_lin = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3)
    saved = sizes["null"]["argument_bytes"] - sizes["nf4"]["argument_bytes"]
    # bf16 (2 bytes) -> 4.25 bits per quantized weight (bf16 scale per 64).
    assert saved == n_lin * 2 - (n_lin // 2 + n_lin // 64 * 2)
    assert sizes["nf4"]["params"] == sizes["null"]["params"]


def test_merged_and_adapter_exports_of_a_quantized_lora_model(tmp_path):
    save_hf(init_model(LlamaConfig.tiny(num_layers=1), seed=0), tmp_path / "base")
    model = jaxtune.from_pretrained(tmp_path / "base", quantize="nf4")
    apply_peft(model, LORA, nnx.Rngs(0))
    for _, lin in quant.targets(model):  # a non-zero update to merge
        lin.lora_b.set_value(0.05 * jnp.ones(lin.lora_b.shape))
    logits = numpy_logits(model, IDS)
    # Merged: dequantize, fold LoRA in, write dense weights; verified on reload.
    export_merged(model, tmp_path / "merged")
    merged = jaxtune.from_pretrained(tmp_path / "merged")
    assert quant.quant_format(merged) is None
    np.testing.assert_allclose(numpy_logits(merged, IDS), logits, atol=1e-4)
    assert quant.quant_format(model) == "nf4"  # the model itself is untouched
    # Adapter: verified against the base quantized the same way.
    export_adapter(model, tmp_path / "adapter", tmp_path / "base")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(ConfigError, match="dequantize"):
        jaxtune.peft.merge(model)


def test_a_qlora_run_reloads_on_its_quantized_base_and_exports_what_it_computes(tmp_path):
    from jaxtune.train.loop import train

    T.write_tiny_model(tmp_path / "model", hidden=64, layers=2)
    T.write_reverse_data(tmp_path / "train.jsonl", n=32)
    cfg = T.write_config(
        tmp_path / "cfg.yaml",
        tmp_path / "model",
        tmp_path / "train.jsonl",
        tmp_path / "run",
        model=f"{{path: {tmp_path / 'model'}, quantize: nf4}}",
        train="{steps: 3, batch_size: 8, seq_len: 32}",
        checkpoint="{async_save: false}",
    )
    from jaxtune.config import load_config

    train(load_config(cfg))
    run = jaxtune.from_pretrained(tmp_path / "run")
    assert quant.quant_format(run) == "nf4"  # the base it was trained on
    ids = np.arange(1, 17, dtype=np.int32)[None]
    logits = numpy_logits(run, ids)
    as_trained = jaxtune.from_pretrained(tmp_path / "run", quantize=None)
    assert quant.quant_format(as_trained) == "nf4"  # None = as trained, for a run dir
    export_merged(run, tmp_path / "merged")
    merged = jaxtune.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(numpy_logits(merged, ids), logits, atol=1e-4)
