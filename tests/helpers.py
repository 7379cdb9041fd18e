"""Helpers shared by several test files: test files never import each other.

pytest puts ``tests/`` on ``sys.path`` (its default ``prepend`` import mode; the tests are
not a package), so test files and conftest ``from helpers import ...``. conftest imports
this module before jax is imported, so torch, transformers and jax are imported inside
the helpers that need them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

# ------------------------------------------------------------------ offline packages


def package_dir(name: str) -> Path:
    """Directory of an installed offline model/data package (never imported)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"offline package {name} is not installed (run `make test`)")
    return Path(list(spec.submodule_search_locations)[0])


# ------------------------------------------- tiny random HF models (torch: the reference)

HF_VOCAB = 128


def hf_gemma(kind: str, tmp_path, vocab=HF_VOCAB, **over):
    """A tiny random HF Gemma saved with save_pretrained; returns (dir, torch model)."""
    import torch
    import transformers

    kinds = {
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }
    torch.manual_seed(0)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        # Larger than the default 0.02 so logits are O(1-10) and a wrong detail (RoPE
        # base, norm offset, window) shows up far above the tolerance.
        initializer_range=0.1,
    )
    common.update(over)
    config_cls, model_cls = kinds[kind]
    cfg = config_cls(**common)
    # Eager is HF's reference math (sdpa cannot soft-cap attention scores).
    cfg._attn_implementation = "eager"
    model = model_cls(cfg)
    # Random init leaves norms at 0 (i.e. scale 1) and biases at 0; perturb them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    out = tmp_path / kind
    model.save_pretrained(out)
    return out, model.eval()


def hf_gpt2(kind: str, tmp_path, vocab=HF_VOCAB, **over):
    """A tiny random HF GPT-2 / GPT-Neo saved with save_pretrained; (dir, torch model)."""
    import torch
    import transformers

    torch.manual_seed(0)
    # initializer_range 0.1 (not 0.02) so logits are O(1-10): wrong details show.
    ids = dict(bos_token_id=vocab - 1, eos_token_id=vocab - 1, initializer_range=0.1)
    if kind == "gpt2":
        kw = dict(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64, **ids)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**kw, **over}))
    elif kind == "gpt_neo":
        kw = dict(
            vocab_size=vocab,
            hidden_size=64,
            num_layers=3,
            num_heads=4,
            max_position_embeddings=64,
            window_size=5,
            # global, local, local: not just the usual alternation.
            attention_types=[[["global", "local"], 1], [["local"], 1]],
            **ids,
        )
        model = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**{**kw, **over}))
    else:
        raise ValueError(kind)
    # Random init leaves LayerNorms at (1, 0) and biases at 0; perturb them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / kind
    model.save_pretrained(out)
    return out, model.eval()


def torch_logits(model, ids, mask=None):
    """float32 numpy logits of a torch causal LM (``mask``: optional attention mask)."""
    import torch

    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.float().numpy()


# ------------------------------------------------------------ PEFT on jaxtune models

# Token ids ``train`` steps on: drawn from 256 tokens (``LlamaConfig.tiny``'s vocab).
TRAIN_IDS = np.random.RandomState(0).randint(0, 256, (2, 12))


def perturb(model, seed=1):
    """Non-zero B (and a moved DoRA magnitude) so merges are actually tested."""
    import jax

    from jaxtune.peft import lora_linears

    key = jax.random.key(seed)
    for _, lin in lora_linears(model):
        key, k1, k2 = jax.random.split(key, 3)
        lin.lora_b.set_value(0.1 * jax.random.normal(k1, lin.lora_b.shape))
        if lin.dora_m is not None:
            m = lin.dora_m[...]
            lin.dora_m.set_value(m * (1 + 0.1 * jax.random.normal(k2, m.shape)))


def lm_loss(model, ids):
    """Mean next-token cross-entropy of ``model`` on ``ids``."""
    import optax

    logits = model(ids)[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def flat_np(state):
    """``{path: numpy array}`` of an ``nnx.State``."""
    from flax import nnx

    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def train(model, peft_cfg, steps=3, optim=None):
    """Runs ``steps`` optimizer steps on the trainable partition of ``model`` (on
    ``TRAIN_IDS``); returns ``((trainable, frozen) numpy snapshots before, trainable,
    opt_state)``."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxtune.config import OptimConfig
    from jaxtune.optim import build_optimizer
    from jaxtune.peft import trainable_filter

    ids = jnp.asarray(TRAIN_IDS)
    filt = trainable_filter(model, peft_cfg)
    graphdef, trainable, frozen = nnx.split(model, filt, ...)
    optim = optim or OptimConfig(lr=1e-2, schedule="constant", weight_decay=0.01)
    opt = build_optimizer(optim, steps, trainable)
    opt_state = opt.init(trainable)
    step = make_train_step(graphdef, opt, lm_loss)
    # numpy snapshots: split states share Variables with the model, which the caller
    # may update with the trained values afterwards.
    before = (flat_np(trainable), flat_np(frozen))
    for _ in range(steps):
        trainable, opt_state, loss = step(trainable, frozen, opt_state, ids)
        assert np.isfinite(float(loss))
    return before, trainable, opt_state


def changed_paths(old, trainable):
    """Paths of ``trainable`` whose values differ from the snapshot ``old``."""
    new = flat_np(trainable)
    return {p for p in new if not np.array_equal(new[p], old[p])}


# ------------------------------------------------------------------------ TensorBoard


def tensorboard_scalars(log_dir) -> dict[tuple[int, str], list[float]]:
    """``(step, tag) -> values`` of every scalar event in the event files of ``log_dir``,
    read by TensorBoard's own ``EventAccumulator``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep all
    acc.Reload()
    out: dict[tuple[int, str], list[float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            out.setdefault((event.step, tag), []).append(event.value)
    return out


def make_train_step(graphdef, optimizer: optax.GradientTransformation, loss_fn):
    """A minimal jitted step over a split model: the reference the trainer's step is tested against.

    Only the trainable partition is differentiated and updated; the frozen partition
    is an input that is passed through untouched.

    Args:
      graphdef: from ``nnx.split(model, trainable_filter, ...)``.
      optimizer: from :func:`build_optimizer`, ``init`` on the trainable partition.
      loss_fn: ``(model, batch) -> scalar loss``.

    Returns:
      ``step(trainable, frozen, opt_state, batch) -> (trainable, opt_state, loss)``.
    """
    from flax import nnx

    @jax.jit
    def step(trainable, frozen, opt_state, batch):
        def loss_of(tr):
            return loss_fn(nnx.merge(graphdef, tr, frozen), batch)

        loss, grads = jax.value_and_grad(loss_of)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step
