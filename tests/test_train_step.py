"""Step-level trainer invariants (no data pipeline): accumulation, FSDP memory, donation
vs async checkpoints, non-finite detection, logging sinks, hardware tables."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import tensorboard_scalars

from jaxtune.config import OptimConfig, PeftConfig, load_config
from jaxtune.models import init_model
from jaxtune.models.llama import LlamaConfig
from jaxtune.models.losses import token_loss_sums
from jaxtune.optim import build_optimizer
from jaxtune.peft.trainable import trainable_filter
from jaxtune.sharding import make_mesh, per_device_bytes, shard_model, state_shardings
from jaxtune.train import hardware
from jaxtune.train.state import init_opt_state, jit_train_step, make_state, train_state_shardings
from jaxtune.train.step import make_train_step
from jaxtune.train.tasks.lm import LM_BATCH


def _batch(rng, b, t, vocab, lengths):
    """A [b, t] batch whose rows have the given numbers of trained tokens."""
    ids = rng.integers(0, vocab, (b, t)).astype(np.int32)
    w = np.zeros((b, t), np.float32)
    for i, n in enumerate(lengths):
        w[i, :n] = 1.0
    mask = np.ones((b, t), np.int32)
    return {
        "input_ids": ids,
        "targets": np.roll(ids, -1, axis=1),
        "loss_weights": w,
        "attention_mask": mask,
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "segment_ids": mask.copy(),
    }


@pytest.fixture(scope="module")
def sgd_steps():
    """A tiny model and its SGD train step, compiled once for A=1 and once for A=2."""
    cfg = LlamaConfig.tiny(vocab_size=64, num_layers=1)  # one layer: half the compile time
    graphdef, params, frozen = nnx.split(init_model(cfg, jnp.float32, seed=0), nnx.Param, ...)
    # SGD: the update is linear in the gradient, so equal updates <=> equal gradients.
    tx = optax.sgd(0.5)
    steps = {a: jax.jit(make_train_step(graphdef, tx, grad_accum=a)) for a in (1, 2)}

    def run(accum, batch, p=params):
        state = {"step": jnp.int32(0), "params": p, "opt_state": tx.init(p), "seed": jnp.uint32(0)}
        return steps[accum](state, frozen, batch)

    return run, params


def test_grad_accumulation_with_uneven_masks_equals_one_big_batch(sgd_steps):
    run, _ = sgd_steps
    rng = np.random.default_rng(0)
    # Micro-batch 1 trains 3 tokens, micro-batch 2 trains 40: a mean of the two
    # micro-batch means would weight 3 tokens like 40; the token-weighted loss must not.
    a = _batch(rng, 4, 16, 64, [1, 2, 0, 0])
    b = _batch(rng, 4, 16, 64, [16, 16, 8, 0])
    full = {k: np.concatenate([a[k], b[k]]) for k in a}
    stacked = {k: np.stack([a[k], b[k]]) for k in a}
    s1, m1 = run(1, full)
    s2, m2 = run(2, stacked)
    assert float(m1["tokens"]) == float(m2["tokens"]) == 3 + 40
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=1e-5)
    assert bool(m1["finite"]) and bool(m2["finite"])


def test_nonfinite_step_is_flagged(sgd_steps):
    run, params = sgd_steps
    batch = _batch(np.random.default_rng(1), 8, 16, 64, [16] * 8)
    assert bool(run(1, batch)[1]["finite"])
    poisoned = {**batch, "loss_weights": batch["loss_weights"].copy()}
    poisoned["loss_weights"][0, 3] = np.nan  # poisoned data
    assert not bool(run(1, poisoned)[1]["finite"])
    # Weights that overflow (an absurd learning rate) are caught too.
    huge = jax.tree.map(lambda x: x * 3e38, params)
    assert not bool(run(1, batch, huge)[1]["finite"])


def test_bf16_state_keeps_its_dtypes_through_a_step():
    """A dtype that changes after step 1 means a second compilation and more memory."""
    cfg = LlamaConfig.tiny(vocab_size=64, num_layers=1)
    model = init_model(cfg, jnp.bfloat16, seed=0)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    tx = build_optimizer(OptimConfig(name="adamw", weight_decay=0.1), 10, params)
    state = {
        "step": jnp.int32(0),
        "params": params,
        "opt_state": tx.init(params),
        "seed": jnp.uint32(0),
    }
    batch = _batch(np.random.default_rng(0), 2, 8, 64, [8, 4])
    for accum in (1, 2):
        b = batch if accum == 1 else {k: np.stack([v, v]) for k, v in batch.items()}
        out, _ = jax.eval_shape(make_train_step(graphdef, tx, grad_accum=accum), state, frozen, b)
        want = [(x.shape, x.dtype) for x in jax.tree.leaves(state)]
        assert [(x.shape, x.dtype) for x in jax.tree.leaves(out)] == want
    assert any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state["opt_state"]))


@pytest.fixture(scope="module")
def fsdp_full():
    """Full fine-tuning of a tiny model on FSDP-8; every "embed" dim (64) divides by 8."""
    cfg = LlamaConfig.tiny(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    )
    mesh = make_mesh(1, 8, 1)
    model = shard_model(init_model(cfg, jnp.float32, seed=0), mesh)
    pcfg = PeftConfig(method="full")
    graphdef, params, frozen = nnx.split(model, trainable_filter(model, pcfg), ...)
    tx = build_optimizer(OptimConfig(name="adamw", lr=0.01), 10, params)
    opt_state = init_opt_state(tx, params, mesh)
    step = jit_train_step(
        graphdef,
        tx,
        train_state_shardings(params, opt_state, mesh),
        state_shardings(frozen, mesh),
        mesh,
        loss_sums=token_loss_sums,
        batch_ndims={k: 2 for k in LM_BATCH},
    )
    from jaxtune.sharding import device_batch

    batch = device_batch(_batch(np.random.default_rng(0), 8, 16, 64, [16] * 8), mesh)
    return types.SimpleNamespace(
        mesh=mesh, params=params, opt_state=opt_state, frozen=frozen, step=step, batch=batch
    )


def test_fsdp8_holds_an_eighth_of_params_and_optimizer_state(fsdp_full):
    f = fsdp_full
    tree = (f.params, f.opt_state)
    total = sum(x.nbytes for x in jax.tree.leaves(tree))
    per = per_device_bytes(tree)
    ratio = per / (total / 8)
    print(f"FSDP-8 per-device bytes {per} / (total {total} / 8) = {ratio:.4f}")
    assert ratio <= 1.15, ratio
    # ... and the compiled step keeps it that way (outputs on the same shardings).
    state = make_state(
        0, jax.tree.map(jnp.copy, f.params), jax.tree.map(jnp.copy, f.opt_state), 0, f.mesh
    )
    state, _ = f.step(state, f.frozen, f.batch)
    assert per_device_bytes((state["params"], state["opt_state"])) == per


def test_async_checkpoint_is_not_changed_by_the_next_donated_step(fsdp_full, tmp_path):
    """Orbax copies to host before ``save`` returns; XLA must not reuse a buffer that is
    still being written (on CPU the host copy may be a view of the device buffer)."""
    from jaxtune.checkpoint import Checkpointer

    f = fsdp_full
    state = make_state(
        0, jax.tree.map(jnp.copy, f.params), jax.tree.map(jnp.copy, f.opt_state), 0, f.mesh
    )
    ckpt = Checkpointer(tmp_path, async_save=True)
    state, _ = f.step(state, f.frozen, f.batch)
    expected = {k: np.array(v[...]) for k, v in nnx.to_flat_state(state["params"])}
    ckpt.save(1, state["params"], state["opt_state"], {"epoch": 0}, {"step": 1})
    for _ in range(3):  # donate the saved buffers while the write may be in flight
        state, _ = f.step(state, f.frozen, f.batch)
    ckpt.wait()
    restored, _, _, _ = ckpt.restore(1, state["params"], None)
    ckpt.close()
    got = dict(nnx.to_flat_state(restored))
    for k, v in expected.items():
        np.testing.assert_array_equal(np.asarray(got[k][...]), v, err_msg=str(k))
    # The live state has moved on, so the comparison is not vacuous.
    now = dict(nnx.to_flat_state(state["params"]))
    assert any(not np.array_equal(np.asarray(now[k][...]), v) for k, v in expected.items())


def test_tensorboard_sink_writes_the_finite_numeric_scalars_of_each_row(tmp_path):
    from jaxtune.train.logger import MetricsLogger

    cfg = load_config(None, ["train.steps=3", "peft.method=full", "logging.progress=false"])
    junk = {"mfu": None, "name": "x", "stopped": True, "nan": float("nan")}
    logged = []
    # A resumed run opens a second writer on the same directory, here within the same
    # second: both files are kept.
    for start, steps in ((0, [1, 2]), (2, [3])):
        log = MetricsLogger(tmp_path, cfg, 3, start, params={"total": 100, "trainable": 10})
        for step in steps:
            row = {"step": step, "loss": 3.0 - step / 4, "lr": 1e-3 * step, "seq_tokens": 64}
            log.log({**row, **junk})
            logged.append(log.rows[-1])
        log.close("done")
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    got = tensorboard_scalars(tmp_path / "tensorboard")
    tags = {"loss", "lr", "seq_tokens", "tokens_per_sec", "flops_per_sec"}
    want = {(r["step"], tag): [float(r[tag])] for r in logged for tag in tags}
    assert got.keys() == want.keys()
    for key, values in want.items():
        np.testing.assert_allclose(got[key], values, rtol=1e-6, err_msg=str(key))


def test_wandb_sink_logs_every_row(tmp_path, monkeypatch):
    logged = []

    class FakeRun:
        id = "abc123"

        def log(self, row, step):
            logged.append((step, row))

        def finish(self):
            logged.append("finished")

    fake = types.SimpleNamespace(init=lambda **kw: FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from jaxtune.train.logger import MetricsLogger

    cfg = load_config(
        None,
        [
            "train.steps=2",
            "peft.method=full",
            "logging.wandb=true",
            "logging.progress=false",
            "logging.tensorboard=false",
        ],
    )
    log = MetricsLogger(tmp_path, cfg, 2, 0, params={"total": 100, "trainable": 10})
    log.log({"step": 1, "loss": 1.0, "lr": 0.1, "seq_tokens": 64})
    log.close("done")
    assert logged[0][0] == 1 and logged[0][1]["loss"] == 1.0
    assert logged[0][1]["flops_per_sec"] > 0 and "mfu" not in logged[0][1]  # None: CPU
    assert logged[-1] == "finished"
    assert (tmp_path / "wandb_id").read_text() == "abc123"


def test_hardware_tables():
    assert hardware.chip_for("TPU v5 lite").name == "v5e"
    assert hardware.chip_for("TPU v5").name == "v5p"
    assert hardware.chip_for("TPU v6 lite").name == "v6e"
    assert hardware.chip_for("TPU v4").hbm_bytes == 32 * 1024**3
    assert hardware.chip_for("NVIDIA H100 80GB HBM3").peak_flops == 989e12
    assert hardware.chip_for("cpu") is None
    assert hardware.peak_flops(jax.devices()) is None  # CPU: no MFU
    assert hardware.flops_per_token(100, 100) == 600  # full fine-tuning: 6N
    assert hardware.flops_per_token(100, 10) == 4 * 90 + 6 * 10  # LoRA-aware


@pytest.mark.parametrize("tied, chunk", [(True, 5), (False, 8)], ids=["tied-pad", "head"])
def test_chunked_cross_entropy_equals_whole_logits(tied, chunk):
    """Loss and gradients with the vocab logits made chunk by chunk (remat'd) equal the
    one-piece loss; 5 does not divide T=16, so the zero-weight padding is exercised."""
    from jaxtune.models.losses import loss_chunk_for, token_loss_sums
    from jaxtune.peft import apply_peft

    cfg = LlamaConfig.tiny(vocab_size=96, num_layers=1, tie_word_embeddings=tied)
    model = init_model(cfg, jnp.float32, seed=0)
    targets = ("q_proj", "v_proj") if tied else ("q_proj", "lm_head")
    apply_peft(model, PeftConfig(method="lora", rank=2, alpha=4.0, targets=targets), nnx.Rngs(1))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)  # all weights trained
    batch = _batch(np.random.default_rng(0), 3, 16, 96, [16, 9, 3])

    def loss(p, chunk):
        s, w = token_loss_sums(nnx.merge(graphdef, p, frozen), batch, None, chunk=chunk)
        return s / w

    whole = jax.jit(jax.value_and_grad(lambda p: loss(p, 0)))(params)
    parts = jax.jit(jax.value_and_grad(lambda p: loss(p, chunk)))(params)
    np.testing.assert_allclose(parts[0], whole[0], rtol=1e-6)
    for (path, g), (_, g0) in zip(
        nnx.to_flat_state(parts[1]), nnx.to_flat_state(whole[1]), strict=True
    ):
        np.testing.assert_allclose(
            g.get_value(), g0.get_value(), rtol=2e-5, atol=1e-7, err_msg=str(path)
        )
    # The lowered program really holds [B, chunk, V] logits, never [B, T, V].
    hlo = jax.jit(lambda p: loss(p, chunk)).lower(params).as_text()
    assert f"3x{chunk}x96xf32" in hlo and "3x16x96xf32" not in hlo
    # Auto: one piece while float32 logits stay under 1 GiB, power-of-two chunks above.
    assert loss_chunk_for(8, 256, 49152, None) == 256
    assert loss_chunk_for(4, 2048, 128256, None) == 128
    assert loss_chunk_for(4, 2048, 128256, 0) == 2048
    assert loss_chunk_for(4, 2048, 128256, 512) == 512
