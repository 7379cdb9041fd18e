"""Classification heads on any backbone: pooling, trainable sets, a train step, and
exports to transformers' ``*ForSequenceClassification`` (same logits after reload)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxtune
from jaxtune.config import PeftConfig
from jaxtune.errors import ConfigError
from jaxtune.eval.classification import _logits
from jaxtune.export.classifier import export_classifier
from jaxtune.models import init_model
from jaxtune.models.bert import BertConfig
from jaxtune.models.heads import SequenceClassifier, layer_states, pool
from jaxtune.models.llama import LlamaConfig
from jaxtune.models.losses import label_loss_sums
from jaxtune.peft import apply_peft, summary
from jaxtune.peft.trainable import classifier_filter
from jaxtune.train.step import make_train_step
from jaxtune.verify import probe_batch


def test_pooling():
    h = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_allclose(pool(h, mask, "cls"), h[:, 0])
    np.testing.assert_allclose(pool(h, mask, "last"), jnp.stack([h[0, 3], h[1, 1]]))
    np.testing.assert_allclose(pool(h, mask, "mean"), jnp.stack([h[0].mean(0), h[1, :2].mean(0)]))
    left = jnp.array([[0, 0, 1, 1]])  # left padding: still the rightmost real token
    np.testing.assert_allclose(pool(h[:1], left, "last"), h[:1, 3])


def test_layer_states_of_a_decoder_without_model_changes():
    # Llama has no all_layers option: the generic recorder path must give HF's
    # hidden_states (last entry before the final norm), scanned or not.
    model = init_model(LlamaConfig.tiny(num_layers=2))
    ids = jnp.array(np.random.RandomState(0).randint(0, 256, (2, 6)), jnp.int32)
    mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2], jnp.int32)
    stack = nnx.jit(layer_states)(model, ids, mask)
    assert stack.shape == (3, 2, 6, 64)
    np.testing.assert_allclose(
        model.embed_tokens(ids), stack[0], atol=1e-6, err_msg="layer 0 = embeddings"
    )
    np.testing.assert_allclose(model.norm(stack[-1]), model.hidden_states(ids, mask), atol=1e-5)


def _clf(cfg, method, pooling=None, **peft):
    clf = SequenceClassifier(init_model(cfg), 3, pooling=pooling, rngs=nnx.Rngs(1))
    pc = PeftConfig(method=method, alpha=16.0, rank=4, **peft)
    apply_peft(clf.backbone, pc)
    return clf, classifier_filter(clf, pc)


def _trainable_paths(clf, filt):
    return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(clf, filt))}


def test_trainable_sets_per_method():
    cfg = LlamaConfig.tiny(scan_layers=False)
    paths = _trainable_paths(*_clf(cfg, "feature"))
    assert paths == {"head/out/kernel"}  # decoder head: no bias (HF's score)
    paths = _trainable_paths(*_clf(cfg, "lora"))
    assert "head/out/kernel" in paths
    assert all(p.startswith("head/") or "lora_" in p for p in paths)
    paths = _trainable_paths(*_clf(cfg, "feature", unfreeze_top_layers=1))
    assert any(p.startswith("backbone/layers/1/") for p in paths)
    assert not any(p.startswith("backbone/layers/0/") for p in paths)
    # Full fine-tuning never trains the (untied) LM head a classifier does not use.
    clf, filt = _clf(cfg, "full")
    assert not any("lm_head" in p for p in _trainable_paths(clf, filt))
    assert summary(clf, filt)["trainable"] < summary(clf, filt)["total"]


def test_train_step_learns_and_keeps_frozen_params_bit_identical():
    clf, filt = _clf(BertConfig.tiny(), "adapter", pooling="cls")
    graphdef, params, frozen = nnx.split(clf, filt, ...)
    before = jax.tree.map(np.asarray, frozen)
    tx = optax.adam(5e-2)
    state = {
        "step": jnp.int32(0),
        "params": params,
        "opt_state": tx.init(params),
        "seed": jnp.uint32(0),
    }
    # The trainer's own step with the classification task's loss.
    step = jax.jit(make_train_step(graphdef, tx, loss_sums=label_loss_sums))
    rs = np.random.RandomState(0)
    batch = {
        "input_ids": jnp.array(rs.randint(0, 128, (8, 10)), jnp.int32),
        "attention_mask": jnp.ones((8, 10), jnp.int32),
        "labels": jnp.array([0, 1, 2, 0, 1, 2, 0, -1], jnp.int32),  # -1: a padding row
    }
    losses = []
    for _ in range(10):
        state, m = step(state, frozen, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, frozen))


# ------------------------------------------------------------------ HF export parity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _hf_backbone(kind, path):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=40,
        )
        model, opts = transformers.BertModel(cfg), dict(pooling="pooler")
        cls = transformers.BertForSequenceClassification
    elif kind == "distilbert":
        cfg = transformers.DistilBertConfig(
            vocab_size=99,
            dim=32,
            hidden_dim=64,
            n_layers=2,
            n_heads=4,
            max_position_embeddings=40,
        )
        model = transformers.DistilBertModel(cfg)
        opts = dict(pooling="cls", head_hidden=32, head_activation="relu")
        cls = transformers.DistilBertForSequenceClassification
    elif kind == "gpt2":  # Conv1D weights, ``LMHeadModel`` naming
        cfg = transformers.GPT2Config(
            vocab_size=99, n_embd=32, n_layer=2, n_head=4, eos_token_id=98
        )
        model, opts = transformers.GPT2LMHeadModel(cfg), dict(pooling="last")
        cls = transformers.GPT2ForSequenceClassification
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
        model, opts = transformers.LlamaForCausalLM(cfg), dict(pooling="last")
        cls = transformers.LlamaForSequenceClassification
    model.save_pretrained(path)
    return opts, cls


@pytest.mark.parametrize("kind", ["bert", "distilbert", "llama", "gpt2"])
def test_export_loads_in_transformers_with_same_logits(tmp_path, kind):
    opts, hf_cls = _hf_backbone(kind, tmp_path / "base")
    backbone = jaxtune.from_pretrained(tmp_path / "base")
    apply_peft(backbone, PeftConfig(method="lora", rank=4, alpha=8.0, targets=("all-linear",)))
    clf = SequenceClassifier(
        backbone, 3, label_names=("neg", "neu", "pos"), rngs=nnx.Rngs(2), **opts
    )
    # Non-trivial LoRA (merged on export) and a head with O(1) logits.
    for _, var in nnx.to_flat_state(nnx.state(clf, nnx.LoRAParam)):
        var.set_value(var[...] + 0.1)
    for _, var in nnx.to_flat_state(nnx.state(clf.head, nnx.Param)):
        var.set_value(var[...] * 50 + 0.1)
    out = tmp_path / "export"
    diff = export_classifier(clf, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [hf_cls.__name__]
    ids, mask = probe_batch(99, config.get("pad_token_id") or 0)
    ours = np.asarray(_logits(clf, ids, mask))
    assert np.abs(ours).max() > 0.1
    tol = 1e-4 * max(1.0, float(np.abs(ours).max()))  # float32 merge of W + s*A@B
    assert diff <= tol
    ref = hf_cls.from_pretrained(out).eval()
    assert ref.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    with torch.no_grad():
        theirs = ref(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
    assert np.abs(ours - theirs.numpy()).max() <= tol
    if kind != "llama":  # export_classifier already reloaded it; once via the public API:
        return
    again = jaxtune.from_pretrained(out)  # sees the architecture, returns a classifier
    assert isinstance(again, SequenceClassifier) and again.label_names == ("neg", "neu", "pos")
    assert np.abs(np.asarray(_logits(again, ids, mask)) - ours).max() <= tol


def test_export_refuses_heads_transformers_cannot_express(tmp_path):
    clf = SequenceClassifier(init_model(BertConfig.tiny()), 2, pooling="mean")
    with pytest.raises(ConfigError, match="no class for this head"):
        export_classifier(clf, tmp_path / "x")
    clf = SequenceClassifier(init_model(BertConfig.tiny()), 2, pooling="pooler")
    apply_peft(clf.backbone, PeftConfig(method="adapter", adapter_size=4))
    with pytest.raises(ConfigError, match="adapters"):
        export_classifier(clf, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
