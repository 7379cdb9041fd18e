"""Held-out loss / perplexity: token-weighted, batch-size independent, sharded == unsharded."""

import json
import math

import numpy as np
import pytest

from jaxtune.data import BatchIterator, DataConfig, build_datasets
from jaxtune.eval.perplexity import evaluate_loss, perplexity_of_data
from jaxtune.models import init_model
from jaxtune.models.llama import LlamaConfig
from jaxtune.sharding import make_mesh, shard_model
from jaxtune.verify import numpy_logits

CFG = LlamaConfig.tiny(vocab_size=49152, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def split(tmp_path_factory, smollm2_gguf):
    """A completion-format split: rows of different lengths, loss on the answers only."""
    from jaxtune.api import load_tokenizer

    root = tmp_path_factory.mktemp("ppl")
    tok = load_tokenizer(smollm2_gguf)
    rows = [
        {
            "prompt": f"Question {i}: what is {i} plus {i}?" + " Think." * (i % 5),
            "completion": f" {2 * i}",
        }
        for i in range(21)
    ]
    path = root / "val.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DataConfig(train=str(path), format="completion", cache_dir=str(root / "cache"))
    return tok, cfg, build_datasets(cfg, tok, 48, splits=("train",))["train"]


def manual_loss(model, ds):
    """Sum of -log p(target) * weight over every batch, divided once (numpy, float64)."""
    s = w = 0.0
    for batch in BatchIterator(ds, 4, shuffle=False, drop_remainder=False, num_epochs=1):
        logits = numpy_logits(model, batch["input_ids"], batch["attention_mask"]).astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        s += float((nll * batch["loss_weights"]).sum())
        w += float(batch["loss_weights"].sum())
    return s / w, w


def test_loss_is_token_weighted_and_batch_size_independent(split):
    tok, cfg, ds = split
    model = init_model(CFG, seed=0)
    ref, tokens = manual_loss(model, ds)
    a = evaluate_loss(model, ds, batch_size=4)
    b = evaluate_loss(model, ds, batch_size=16)
    assert a["tokens"] == b["tokens"] == int(tokens)
    assert a["loss"] == pytest.approx(ref, rel=1e-5)
    assert b["loss"] == pytest.approx(ref, rel=1e-5)
    assert a["perplexity"] == pytest.approx(math.exp(a["loss"]))
    assert evaluate_loss(model, ds, batch_size=4, max_batches=2)["batches"] == 2
    c = perplexity_of_data(model, tok, cfg, split="train", seq_len=48, batch_size=8)
    assert c["loss"] == pytest.approx(ref, rel=1e-5) and c["split"] == "train"


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_equals_single_device(split, mesh_shape):
    _, _, ds = split
    single = evaluate_loss(init_model(CFG, seed=0), ds, batch_size=8)
    mesh = make_mesh(*mesh_shape)
    sharded_model = shard_model(init_model(CFG, seed=0), mesh)
    sharded = evaluate_loss(sharded_model, ds, batch_size=8, mesh=mesh)
    assert sharded["tokens"] == single["tokens"]
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)
