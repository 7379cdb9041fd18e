"""BERT / DistilBERT encoders: parity with transformers on tiny random models, and back."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxtune  # noqa: E402
from jaxtune.errors import ConfigError  # noqa: E402

TOL = 1e-4


def _inputs(vocab: int):
    ids = np.random.RandomState(0).randint(1, vocab, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


def _tiny_bert(tmp_path, cls=None, **kw):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
        **kw,
    )
    model = (cls or transformers.BertModel)(cfg).eval()
    model.save_pretrained(tmp_path)
    return model


def _tiny_distilbert(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(
        vocab_size=99, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=40
    )
    model = transformers.DistilBertModel(cfg).eval()
    model.save_pretrained(tmp_path)
    return model


def _torch_out(model, ids, mask, **kw):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), **kw
        )


def _masked_diff(a, b, mask):
    # Padding positions are not compared: they have no meaning (HF and we both fill them).
    return float(np.abs((np.asarray(a) - np.asarray(b)) * mask[..., None]).max())


@pytest.mark.parametrize("scan", [True, False])
def test_bert_hidden_states_pooler_and_layers_match(tmp_path, scan):
    ref = _tiny_bert(tmp_path, hidden_act="gelu_new")
    ids, mask = _inputs(99)
    model = jaxtune.from_pretrained(tmp_path, scan_layers=scan)
    assert model.config.pooler and model.config.hidden_act == "gelu_new"
    out = _torch_out(ref, ids, mask, output_hidden_states=True)
    h = model(ids, mask)
    assert h.shape == (2, 12, 32)
    assert _masked_diff(h, out.last_hidden_state.numpy(), mask) <= TOL
    pooled = np.asarray(model.pooled_output(h))
    assert np.abs(pooled - out.pooler_output.numpy()).max() <= TOL
    stack = model.hidden_states(ids, mask, all_layers=True)
    assert stack.shape == (3, 2, 12, 32)
    for k, ref_k in enumerate(out.hidden_states):
        assert _masked_diff(stack[k], ref_k.numpy(), mask) <= TOL, k


def test_distilbert_matches(tmp_path):
    ref = _tiny_distilbert(tmp_path)
    ids, mask = _inputs(99)
    model = jaxtune.from_pretrained(tmp_path)
    assert model.config.family == "distilbert" and model.token_type_embed is None
    h = model(ids, mask)
    assert _masked_diff(h, _torch_out(ref, ids, mask).last_hidden_state.numpy(), mask) <= TOL


def test_encoder_loads_from_task_checkpoint(tmp_path):
    # BertForMaskedLM: ``bert.`` prefixes, an MLM head to drop, no pooler.
    ref = _tiny_bert(tmp_path, cls=transformers.BertForMaskedLM)
    ids, mask = _inputs(99)
    model = jaxtune.from_pretrained(tmp_path)
    assert model.pooler is None
    out = _torch_out(ref, ids, mask, output_hidden_states=True)
    assert _masked_diff(model(ids, mask), out.hidden_states[-1].numpy(), mask) <= TOL


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_save_pretrained_roundtrip_loads_in_transformers(tmp_path, family):
    src, out = tmp_path / "src", tmp_path / "out"
    (_tiny_bert if family == "bert" else _tiny_distilbert)(src)
    model = jaxtune.from_pretrained(src)
    jaxtune.save_pretrained(model, out)
    cls = transformers.BertModel if family == "bert" else transformers.DistilBertModel
    back = cls.from_pretrained(out).eval()
    ids, mask = _inputs(99)
    got = _torch_out(back, ids, mask).last_hidden_state.numpy()
    assert _masked_diff(model(ids, mask), got, mask) <= TOL


def test_math_changing_config_is_rejected(tmp_path):
    _tiny_bert(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["position_embedding_type"] = "relative_key"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="position_embedding_type"):
        jaxtune.from_pretrained(tmp_path)
