"""Packing, padding, truncation and the resumable, sharded batch iterator."""

import json
from collections import Counter

import numpy as np
import pytest

from jaxtune.data import BatchIterator, DataConfig, build_datasets, pack_lengths, padded_length
from jaxtune.errors import DataError


def instruction_rows(n: int):
    return [
        {
            "instruction": f"Repeat the word {i} " + "very " * (i % 7) + "carefully.",
            "output": " ".join([f"w{i}"] * (1 + (i * 5) % 13)),
        }
        for i in range(n)
    ]


def build(tmp_path, tok, rows, seq_len=128, name="data.jsonl", **cfg):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg.setdefault("cache_dir", str(tmp_path / "cache"))
    return build_datasets(DataConfig(train=str(path), **cfg), tok, seq_len)["train"]


def all_batches(ds, batch_size=4):
    return list(BatchIterator(ds, batch_size, shuffle=False, drop_remainder=False, num_epochs=1))


def segments_of(batch):
    """Per (row, segment): the (token, target, weight) triples and the positions."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        real = batch["attention_mask"][r].astype(bool)
        np.testing.assert_array_equal(seg > 0, real)
        ids = seg[real]
        # Segments are contiguous and numbered 1, 2, ... from the left.
        assert ids.tolist() == sorted(ids.tolist()) and set(ids.tolist()) == set(
            range(1, ids.max() + 1 if len(ids) else 1)
        )
        assert not real[real.sum() :].any(), "padding only at the end of a row"
        for s in range(1, (ids.max() if len(ids) else 0) + 1):
            where = seg == s
            triples = tuple(
                zip(
                    batch["input_ids"][r][where].tolist(),
                    batch["targets"][r][where].tolist(),
                    batch["loss_weights"][r][where].tolist(),
                    strict=True,
                )
            )
            out.append((triples, batch["positions"][r][where]))
        assert batch["loss_weights"][r][~real].sum() == 0
    return out


def test_packed_rows_hold_the_same_triples_as_unpacked(tmp_path, smollm2_tokenizer):
    rows = instruction_rows(40)
    unpacked = build(tmp_path, smollm2_tokenizer, rows, seq_len=96)
    packed = build(tmp_path, smollm2_tokenizer, rows, seq_len=96, packing=True)
    assert unpacked.fingerprint == packed.fingerprint  # packing reuses the token cache
    assert len(packed) < len(unpacked) == 40
    assert packed.row_lengths.max() <= 96
    u = segments_of_all(unpacked)
    p = segments_of_all(packed)
    assert Counter(t for t, _ in u) == Counter(t for t, _ in p)
    for triples, positions in p:
        np.testing.assert_array_equal(positions, np.arange(len(triples)))
        # The last token of a segment never has a trained target: no loss across segments.
        assert triples[-1][2] == 0.0
        assert sum(w for _, _, w in triples) > 0
    # Within a segment, targets are the next tokens of the same example.
    for triples, _ in p:
        toks = [t for t, _, _ in triples]
        assert [g for _, g, _ in triples[:-1]] == toks[1:]


def segments_of_all(ds):
    return [s for b in all_batches(ds) for s in segments_of(b)]


def test_pack_lengths_best_fit():
    lengths = np.array([5, 3, 8, 2, 6, 1, 4, 7])
    offsets, examples = pack_lengths(lengths, 8)
    rows = [examples[offsets[r] : offsets[r + 1]].tolist() for r in range(len(offsets) - 1)]
    assert sorted(e for r in rows for e in r) == list(range(8))
    assert all(lengths[r].sum() <= 8 for r in rows)
    assert len(rows) == int(np.ceil(lengths.sum() / 8))  # perfect fit exists and is found


def test_padding_multiple_and_buckets(tmp_path, smollm2_tokenizer):
    rows = instruction_rows(12)
    ds = build(tmp_path, smollm2_tokenizer, rows, pad_to_multiple_of=16)
    for b in all_batches(ds, 3):
        t = b["input_ids"].shape[1]
        assert t % 16 == 0 and t - 16 < b["attention_mask"].sum(1).max() <= t
    ds = build(tmp_path, smollm2_tokenizer, rows, length_buckets=(40, 64, 128))
    assert {b["input_ids"].shape[1] for b in all_batches(ds, 3)} <= {40, 64, 128}
    assert padded_length(65, 8, (40, 64)) == 72  # no bucket fits: multiple of 8


def test_padding_uses_masks_not_ids(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # SmolLM2 pads with its EOS
    ds = build(tmp_path, tok, instruction_rows(6))
    for b in all_batches(ds, 3):
        for r in range(3):
            n = int(b["attention_mask"][r].sum())
            ids = b["input_ids"][r]
            assert ids[n - 1] == tok.eos_token_id and b["loss_weights"][r, n - 2] == 1.0
            assert (ids[n:] == tok.pad_token_id).all() and b["loss_weights"][r, n - 1 :].sum() == 0


def test_truncation_sides_and_counts(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows = [
        {"instruction": "Say it.", "output": "word " * 60},
        {"instruction": "Hi", "output": "Hello"},
    ]
    full = tok(
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay it.\n\n### Response:\n" + "word " * 60
    )["input_ids"] + [tok.eos_token_id]
    right = build(tmp_path, tok, rows, seq_len=48)
    assert right.stats["truncated"] == 1 and right.full_lengths[0] == len(full)
    assert right.example(0)[0].tolist() == full[:48]
    left = build(tmp_path, tok, rows, seq_len=48, truncation_side="left")
    assert left.example(0)[0].tolist() == full[-48:] and left.example(0)[1].all()
    long_prompt = [{"instruction": "Explain " * 80, "output": "No."}, rows[1]]
    with pytest.raises(DataError, match=r"data\.jsonl:1: empty loss mask after truncating"):
        build(tmp_path, tok, long_prompt, seq_len=48)
    ds = build(tmp_path, tok, long_prompt, seq_len=48, skip_invalid=True)
    assert ds.num_examples == 1
    assert ds.stats["skipped_by_reason"] == {"empty loss mask after truncation": 1}


def test_resume_yields_exactly_the_remaining_batches(tmp_path, smollm2_tokenizer):
    ds = build(tmp_path, smollm2_tokenizer, instruction_rows(22))
    kwargs = dict(seed=7, num_epochs=3)
    reference = list(BatchIterator(ds, 4, **kwargs))
    assert len(reference) == 3 * (22 // 4)
    for p in (0, 3, 5, 6, 11, len(reference)):
        it = BatchIterator(ds, 4, **kwargs)
        for _ in range(p):
            next(it)
        state = json.loads(json.dumps(it.state()))  # survives a JSON checkpoint
        resumed = list(BatchIterator.from_state(ds, state, num_epochs=3))
        assert len(resumed) == len(reference) - p
        for a, b in zip(resumed, reference[p:], strict=True):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_resume_computes_position_without_replay(tmp_path, smollm2_tokenizer, monkeypatch):
    import jaxtune.data.iterator as iterator

    ds = build(tmp_path, smollm2_tokenizer, instruction_rows(22))
    calls = []
    real = iterator.collate
    monkeypatch.setattr(iterator, "collate", lambda *a: calls.append(1) or real(*a))
    state = {**BatchIterator(ds, 4, seed=1).state(), "epoch": 40, "step": 2}
    it = BatchIterator.from_state(ds, state)
    next(it)
    assert len(calls) == 1 and it.state()["step"] == 3


def test_order_depends_on_seed_and_epoch_only(tmp_path, smollm2_tokenizer):
    ds = build(tmp_path, smollm2_tokenizer, instruction_rows(22))
    a, b, c = (BatchIterator(ds, 2, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.order(0), b.order(0))
    assert a.order(0).tolist() != a.order(1).tolist()
    assert a.order(0).tolist() != c.order(0).tolist()


def test_restore_rejects_other_data(tmp_path, smollm2_tokenizer):
    ds = build(tmp_path, smollm2_tokenizer, instruction_rows(22))
    state = BatchIterator(ds, 4, seed=1).state()
    with pytest.raises(DataError, match="batch_size"):
        BatchIterator(ds, 2, seed=1).restore(state)
    with pytest.raises(DataError, match="fingerprint"):
        BatchIterator(ds, 4, seed=1).restore({**state, "fingerprint": "other"})


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_host_shards_are_disjoint_and_cover_the_epoch(tmp_path, smollm2_tokenizer, drop_remainder):
    ds = build(tmp_path, smollm2_tokenizer, instruction_rows(23))
    hosts = [
        BatchIterator(
            ds,
            8,
            seed=3,
            process_index=p,
            process_count=2,
            num_epochs=1,
            drop_remainder=drop_remainder,
        )
        for p in range(2)
    ]
    seen = [[], []]
    for step in range(hosts[0].steps_per_epoch):
        batches = [next(h) for h in hosts]
        assert (
            batches[0]["input_ids"].shape
            == batches[1]["input_ids"].shape
            == (4, batches[0]["input_ids"].shape[1])
        )
        for p in range(2):
            rows = hosts[p].local_rows(0, step)
            seen[p] += [r for r in rows.tolist() if r >= 0]
            for j, r in enumerate(rows.tolist()):
                n = int(batches[p]["attention_mask"][j].sum())
                if r < 0:
                    assert n == 0
                else:
                    np.testing.assert_array_equal(batches[p]["input_ids"][j, :n], ds.example(r)[0])
    for h in hosts:
        with pytest.raises(StopIteration):
            next(h)
    assert not set(seen[0]) & set(seen[1])
    covered = set(seen[0]) | set(seen[1])
    if drop_remainder:
        assert len(covered) == 16
    else:
        assert covered == set(range(23))
    # The union is the single-host order of that epoch.
    single = BatchIterator(ds, 8, seed=3, num_epochs=1, drop_remainder=drop_remainder)
    assert sorted(covered) == sorted(single.order(0)[: len(covered)].tolist())
