"""Packed rows give every example exactly the loss it has unpacked (attention stays inside)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.data import BatchIterator, DataConfig, build_datasets
from jaxtune.models import init_model
from jaxtune.models.llama import LlamaConfig


def per_example_losses(model, dataset, batch_size=4):
    """{(sum of trained target ids, n trained): summed nll} for every example in a split."""

    @nnx.jit
    def token_nll(model, b):
        logits = model(
            b["input_ids"],
            b["attention_mask"],
            positions=b["positions"],
            segment_ids=b["segment_ids"],
        )
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]

    out = []
    it = BatchIterator(dataset, batch_size, shuffle=False, drop_remainder=False, num_epochs=1)
    for batch in it:
        nll = np.asarray(token_nll(model, {k: jnp.asarray(v) for k, v in batch.items()}))
        for r in range(nll.shape[0]):
            for seg in np.unique(batch["segment_ids"][r]):
                if seg == 0:
                    continue
                sel = (batch["segment_ids"][r] == seg) & (batch["loss_weights"][r] > 0)
                out.append(
                    (int(batch["targets"][r][sel].sum()), int(sel.sum()), float(nll[r][sel].sum()))
                )
    return sorted(out)


def test_packed_equals_unpacked_per_example(tmp_path, smollm2_tokenizer):
    rng = np.random.default_rng(0)
    words = "one two three four five six seven eight nine ten".split()
    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        for _ in range(24):
            q = " ".join(rng.choice(words, rng.integers(1, 7)))
            f.write(
                json.dumps({"instruction": f"Count: {q}", "output": str(len(q.split()))}) + "\n"
            )
    cfg = LlamaConfig.tiny(vocab_size=len(smollm2_tokenizer), num_layers=2)
    model = init_model(cfg, seed=1)
    losses = {}
    for packing in (False, True):
        dc = DataConfig(
            train=str(path),
            format="instruction",
            template="plain",
            packing=packing,
            cache_dir=str(tmp_path / "c"),
        )
        ds = build_datasets(dc, smollm2_tokenizer, 64, splits=("train",))["train"]
        if packing:
            assert len(ds) < 24  # several examples share a row
        losses[packing] = per_example_losses(model, ds)
    a, b = losses[False], losses[True]
    assert len(a) == len(b) == 24
    for (ta, na, la), (tb, nb, lb) in zip(a, b, strict=True):
        assert (ta, na) == (tb, nb)
        assert abs(la - lb) <= 1e-5 * max(1.0, abs(la))
