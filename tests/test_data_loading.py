"""File formats, bad data, splits, duplicates and the tokenization cache."""

import csv
import gzip
import json

import numpy as np
import pytest

import jaxtune.data.tokenized as tokenized
from jaxtune.data import DataConfig, build_datasets, load_split
from jaxtune.errors import DataError

ROWS = [
    {"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i + 1)))} for i in range(10)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def build(tmp_path, tok, seq_len=128, **cfg):
    cfg.setdefault("cache_dir", str(tmp_path / "cache"))
    return build_datasets(DataConfig(**cfg), tok, seq_len)


def token_lists(ds):
    return [ds.example(i)[0].tolist() for i in range(ds.num_examples)]


def test_all_file_types_give_the_same_examples(tmp_path, smollm2_tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    ref = token_lists(
        build(tmp_path, smollm2_tokenizer, train=write_jsonl(tmp_path / "a.jsonl", ROWS))["train"]
    )
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "output"])
        w.writeheader()
        w.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "dd")
    )
    for path in ["a.json", "b.jsonl.gz", "a.csv", "a.parquet", "saved", "dd"]:
        got = build(tmp_path, smollm2_tokenizer, train=str(tmp_path / path))["train"]
        assert token_lists(got) == ref, path
    # A glob over two halves gives the examples of both files, in file order.
    write_jsonl(tmp_path / "part-0.jsonl", ROWS[:4])
    write_jsonl(tmp_path / "part-1.jsonl", ROWS[4:])
    got = build(tmp_path, smollm2_tokenizer, train=str(tmp_path / "part-*.jsonl"))["train"]
    assert token_lists(got) == ref


def test_nested_fields_and_missing_split_in_dataset_dict(tmp_path, smollm2_tokenizer):
    import datasets

    rows = [{"doc": {"question": r["instruction"], "answer": r["output"]}} for r in ROWS]
    fields = {"instruction": "doc.question", "output": "doc.answer"}
    got = build(
        tmp_path, smollm2_tokenizer, train=write_jsonl(tmp_path / "n.jsonl", rows), fields=fields
    )
    ref = build(tmp_path, smollm2_tokenizer, train=write_jsonl(tmp_path / "a.jsonl", ROWS))
    assert token_lists(got["train"]) == token_lists(ref["train"])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "dd")
    )
    with pytest.raises(DataError, match=r"dd: saved DatasetDict has no split 'dev'"):
        build(tmp_path, smollm2_tokenizer, train=str(tmp_path / "dd"), split="dev")


def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "content, pattern",
    [
        (
            b'{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n',
            r"bad\.jsonl:2: malformed JSON \(Expecting ',' delimiter at column \d+\); "
            r"expected one JSON object per line",
        ),
        (
            b'{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n',
            r"bad\.jsonl:3: missing field 'output' \(instruction format reads instruction, output",
        ),
        (
            b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n',
            r"bad\.jsonl:2: bytes .* at column 21 are not valid UTF-8; expected UTF-8 text",
        ),
        (b"", r"bad\.jsonl: file is empty; expected at least one row"),
        (b"\n  \n", r"bad\.jsonl: file is empty"),
        (b"[1, 2]\n", r"bad\.jsonl:1: expected a JSON object, got list"),
        (
            b'{"instruction": 3, "output": "b"}\n',
            r"bad\.jsonl:1: field 'instruction' is int 3; expected a string",
        ),
    ],
)
def test_bad_jsonl_rows_are_one_line_errors(tmp_path, smollm2_tokenizer, content, pattern):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=pattern) as e:
        build(tmp_path, smollm2_tokenizer, train=str(tmp_path / "bad.jsonl"))
    one_line_error(e)


def test_bad_csv_and_labels(tmp_path, smollm2_tokenizer):
    (tmp_path / "bad.csv").write_bytes(b"text,label\ngood,pos\n\xff\xfebad,neg\nfine,neg\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: bytes .* not valid UTF-8") as e:
        build(tmp_path, smollm2_tokenizer, train=str(tmp_path / "bad.csv"), format="classification")
    one_line_error(e)
    # Skipping a non-UTF-8 row keeps reading the rows after it.
    ds = build(
        tmp_path,
        smollm2_tokenizer,
        train=str(tmp_path / "bad.csv"),
        format="classification",
        skip_invalid=True,
    )["train"]
    assert ds.num_examples == 2 and ds.stats["skipped_by_reason"] == {"not UTF-8": 1}
    (tmp_path / "short.csv").write_text("text,label\ngood,pos\nonly-one-column\n")
    with pytest.raises(DataError, match=r"short\.csv:3: has 1 columns; expected 2"):
        build(
            tmp_path, smollm2_tokenizer, train=str(tmp_path / "short.csv"), format="classification"
        )
    rows = [{"text": "good", "label": "pos"}, {"text": "meh", "label": "neutral"}]
    with pytest.raises(
        DataError,
        match=r"l\.jsonl:2: field 'label' = 'neutral' is not in the label set \['neg', 'pos'\]",
    ) as e:
        build(
            tmp_path,
            smollm2_tokenizer,
            train=write_jsonl(tmp_path / "l.jsonl", rows),
            format="classification",
            labels=("neg", "pos"),
        )
    one_line_error(e)


def test_unknown_paths_and_types(tmp_path, smollm2_tokenizer):
    with pytest.raises(DataError, match=r"nope\.jsonl: data\.train not found"):
        build(tmp_path, smollm2_tokenizer, train=str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DataError, match=r"x\.xml: unsupported data file type"):
        build(tmp_path, smollm2_tokenizer, train=str(tmp_path / "x.xml"))
    with pytest.raises(DataError, match=r"data\.fields: unknown field\(s\) \['question'\]"):
        build(
            tmp_path,
            smollm2_tokenizer,
            train=write_jsonl(tmp_path / "a.jsonl", ROWS),
            fields={"question": "q"},
        )


def test_skip_invalid_counts_bad_rows(tmp_path, smollm2_tokenizer):
    lines = [
        b'{"text": "fine", "label": "pos"}',
        b'{"text": "broken" "label": "pos"}',
        b'{"text": "no label"}',
        b'{"text": "caf\xe9", "label": "neg"}',
        b'{"text": "meh", "label": "neutral"}',
        b'{"text": "bad", "label": "neg"}',
    ]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    ds = build(
        tmp_path,
        smollm2_tokenizer,
        train=str(tmp_path / "mixed.jsonl"),
        format="classification",
        labels=("neg", "pos"),
        skip_invalid=True,
    )["train"]
    assert ds.num_examples == 2 and ds.labels.tolist() == [1, 0]
    assert ds.stats["skipped"] == 4
    assert ds.stats["skipped_by_reason"] == {
        "malformed JSON": 1,
        "missing field": 1,
        "not UTF-8": 1,
        "label not in label set": 1,
    }
    assert any("mixed.jsonl:5" in m for m in ds.stats["skipped_examples"])
    (tmp_path / "allbad.jsonl").write_bytes(lines[1] + b"\n")
    with pytest.raises(
        DataError, match=r"data\.train: no usable examples \(1 rows read; skipped 1"
    ):
        build(tmp_path, smollm2_tokenizer, train=str(tmp_path / "allbad.jsonl"), skip_invalid=True)


def test_holdout_splits_are_deterministic_disjoint_and_exact(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"i": i} for i in range(50)])
    cfg = DataConfig(train=path, validation_fraction=0.2, test_fraction=0.1, split_seed=5)

    def ids(c, split):
        return [r.row["i"] for r in load_split(c, split)]

    parts = {s: ids(cfg, s) for s in ("train", "validation", "test")}
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [35, 10, 5]
    assert sorted(sum(parts.values(), [])) == list(range(50))
    assert parts == {s: ids(cfg, s) for s in parts}
    other = DataConfig(train=path, validation_fraction=0.2, test_fraction=0.1, split_seed=6)
    assert ids(other, "validation") != parts["validation"]
    # A split's own file wins over holding out.
    own = DataConfig(train=path, validation=path, validation_fraction=0.2)
    assert len(ids(own, "train")) == 50 and len(ids(own, "validation")) == 50
    assert load_split(DataConfig(train=path), "test") is None


def test_duplicates_and_overlap_are_reported(tmp_path, smollm2_tokenizer):
    train = ROWS[:6] + ROWS[:2]  # two duplicates inside train
    val = ROWS[5:8]  # one row also in train
    ds = build(
        tmp_path,
        smollm2_tokenizer,
        train=write_jsonl(tmp_path / "t.jsonl", train),
        validation=write_jsonl(tmp_path / "v.jsonl", val),
    )
    assert ds["train"].stats["duplicates"] == 2 and ds["validation"].stats["duplicates"] == 0
    assert ds["validation"].stats["overlap"] == {"train": 1}
    assert ds["train"].stats["overlap"] == {"validation": 1}


def test_tokenization_is_cached_by_content_tokenizer_and_seq_len(
    tmp_path, smollm2_tokenizer, monkeypatch
):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, ROWS)
    first = build(tmp_path, smollm2_tokenizer, train=str(path))["train"]
    assert isinstance(first.tokens, np.memmap)

    def fail(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokenized, "make_encoder", fail)
    again = build(tmp_path, smollm2_tokenizer, train=str(path))["train"]
    assert again.path == first.path
    with pytest.raises(AssertionError, match="tokenized again"):
        build(tmp_path, smollm2_tokenizer, seq_len=64, train=str(path))
    with pytest.raises(AssertionError, match="tokenized again"):
        build(tmp_path, smollm2_tokenizer, train=str(path), template="plain")
    write_jsonl(path, ROWS[:-1])
    with pytest.raises(AssertionError, match="tokenized again"):
        build(tmp_path, smollm2_tokenizer, train=str(path))
