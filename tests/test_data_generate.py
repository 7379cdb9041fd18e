"""``jaxtune data generate``: parsing, every filter reason, resume, refusals, training on it.

The end-to-end runs use two tiny models. A *bigram* Llama whose weights are written by
hand: its layers add nothing (zero output projections), embeddings are orthonormal and
the LM head maps each token's embedding to a chosen next token, so greedy decoding
follows a table ``token -> next token``. A document's last word picks the reply, which
makes every filter reason reachable from real generation. And the random tiny Llama of
``jaxtune.train.testing`` with sampling, for resume (per-sample random streams).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from jaxtune.cli import main
from jaxtune.config import load_config
from jaxtune.data import build_datasets
from jaxtune.errors import ConfigError, DataError
from jaxtune.eval.generate import SamplingConfig, generate_ids
from jaxtune.loading import from_pretrained, load_tokenizer
from jaxtune.synth.filters import REASONS, FilterConfig, Filters, minhash, normalize
from jaxtune.synth.generate import GenerateOptions, generate_data, sample_seed
from jaxtune.synth.output import side_paths
from jaxtune.synth.sources import load_documents, split_chunks
from jaxtune.synth.templates import load_template
from jaxtune.train.testing import write_config

OK_Q = [f"w{i:02d}" for i in range(1, 11)]
OK_A = [f"w{i:02d}" for i in range(11, 21)]
# Each trigger word (a document's last word) starts one reply; "</s>" ends it.
CHAINS = {
    "t_ok": ["Q1:", *OK_Q, "A1:", *OK_A],  # accepted, then its greedy repeat: duplicate
    "t_near": ["Q2:", *(w.upper() for w in OK_Q), "A2:", *(w.upper() for w in OK_A[:-1]), "wxx"],
    "t_empty": [],  # EOS at once
    "t_blank": ["Q3:", "A3:", "v1", "v2"],  # no instruction text
    "t_junk": ["just", "some", "words"],  # no labels
    "t_unsup": ["Q4:", "what", "is", "it", "A4:", "zebra", "unicorn"],
}
# Seven more short pairs, accepted (and their greedy repeats duplicates): 8 rows to train on.
EXTRA = range(5, 12)
CHAINS.update({f"t_ok{i}": [f"Q{i}:", f"x{i}", f"A{i}:", f"y{i}"] for i in EXTRA})
LOOP = ["l1", "l2", "l3"]  # t_loop -> l1 -> l2 -> l3 -> l1 ...: never ends
DOCS = [
    ("ok", " ".join([*OK_Q, *OK_A, "t_ok"])),
    ("near", " ".join([*OK_Q, *OK_A, "t_near"])),
    ("empty", "some text t_empty"),
    ("blank", "v1 v2 t_blank"),
    ("loop", "round and round t_loop"),
    ("junk", "anything t_junk"),
    ("unsup", "alpha beta t_unsup"),
    *((f"ok{i}", f"y{i} t_ok{i}") for i in EXTRA),
]
EXPECTED = {
    "empty": 4,
    "too_long": 2,
    "unparseable": 2,
    "repetitive": 0,
    "unsupported": 2,
    "duplicate": 8,
    "near_duplicate": 2,
}
LAYOUT = (
    "{#\ninstruction: Question, "
    + ", ".join(f"Q{i}" for i in range(1, 12))
    + "\noutput: Answer, "
    + ", ".join(f"A{i}" for i in range(1, 12))
    + "\n#}\n"
)


def write_bigram_model(out: Path) -> Path:
    """An HF Llama dir + word-level tokenizer that greedily follows CHAINS and LOOP."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    words = sorted({w for c in CHAINS.values() for w in c} | set(CHAINS) | {"t_loop", *LOOP})
    vocab = {w: i for i, w in enumerate(specials + words)}
    nxt = {}
    for trigger, chain in CHAINS.items():
        seq = [trigger, *chain, "</s>"]
        nxt.update(zip(seq[:-1], seq[1:], strict=True))
    nxt.update({"t_loop": "l1", "l1": "l2", "l2": "l3", "l3": "l1"})
    v, h = len(vocab), 128
    assert v <= h
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(h, h)))
    emb = q[:v].astype(np.float32)  # orthonormal rows: RMSNorm makes each sqrt(h) long
    head = np.zeros((v, h), np.float32)
    for a, b in nxt.items():
        head[vocab[b]] += emb[vocab[a]]
    out.mkdir(parents=True)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    ).save_pretrained(out)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": v,
        "hidden_size": h,
        "intermediate_size": 2 * h,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": vocab["<s>"],
        "eos_token_id": vocab["</s>"],
        "pad_token_id": vocab["<pad>"],
    }
    (out / "config.json").write_text(json.dumps(config))
    zeros = {
        f"model.layers.0.{name}.weight": np.zeros(shape, np.float32)
        for name, shape in {
            "self_attn.q_proj": (h, h),
            "self_attn.k_proj": (h, h),
            "self_attn.v_proj": (h, h),
            "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (2 * h, h),
            "mlp.up_proj": (2 * h, h),
            "mlp.down_proj": (h, 2 * h),
        }.items()
    }
    ones = np.ones(h, np.float32)
    save_file(
        {
            **zeros,
            "model.layers.0.input_layernorm.weight": ones,
            "model.layers.0.post_attention_layernorm.weight": ones,
            "model.norm.weight": ones,
            "model.embed_tokens.weight": emb,
            "lm_head.weight": head,
        },
        str(out / "model.safetensors"),
    )
    return out


@pytest.fixture(scope="module")
def bigram(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    model = write_bigram_model(root / "bigram")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in DOCS))
    template = root / "layout.jinja"
    template.write_text(LAYOUT + "{{ document }}")
    return root, model, docs, template


def gen_args(model, docs, template, out, *extra):
    return [
        "data", "generate", "--model", model, "--input", docs, "--template", template,
        "--out", out, "--id-field", "id", "--per-doc", "2", "--temperature", "0",
        "--max-new-tokens", "32", "--require-support", *extra,
    ]  # fmt: skip


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Question: What is X?\nAnswer: Y.", ("What is X?", "Y.")),
        ("**Question:** What?\n**Answer:** 42", ("What?", "42")),
        ("### Question 1: Why?\n### Answer 1: Because.", ("Why?", "Because.")),
        ("1. question: a b\n2. ANSWER: c d\nQuestion: next one", ("a b", "c d")),
        ("Sure, here it is.\n\nQuestion: Who?\nAnswer: Ann\nand Bob.", ("Who?", "Ann\nand Bob.")),
        ("Question: What is 2+2? Answer: 4", ("What is 2+2?", "4")),
        ("Q: short?\nA: yes", ("short?", "yes")),
        ("What is it? Answer: none", None),
        ("Question: only a question", None),
        ("no layout at all", None),
        ("Option A: red", None),
    ],
)
def test_qa_parsing(text, expected):
    pair = load_template("qa").parse(text)
    if expected is None:
        assert pair is None
    else:
        assert (pair["instruction"], pair["output"], pair["input"]) == (*expected, "")


def test_instruction_parsing_with_and_without_input():
    t = load_template("instruction")
    pair = t.parse("Instruction: Summarize.\nInput: The text.\nResponse: Short.")
    assert pair == {"instruction": "Summarize.", "input": "The text.", "output": "Short."}
    pair = t.parse("**Instruction**: List two.\n**Output**: a, b")
    assert pair == {"instruction": "List two.", "input": "", "output": "a, b"}


# ------------------------------------------------------------------ filters


def test_every_filter_reason_directly():
    f = Filters(FilterConfig(max_chars=50, require_support=True))
    src = "Water boils at one hundred degrees Celsius at sea level."
    good = {
        "instruction": "At what temperature does water boil?",
        "input": "",
        "output": "one hundred degrees Celsius",
    }
    judge = lambda text, pair, finish="eos": f.judge(text, finish, pair, src)  # noqa: E731
    assert judge("   ", None) == "empty"
    assert judge("Question: x", good, finish="length") == "too_long"
    assert judge("x" * 51, good) == "too_long"
    assert judge("no layout", None) == "unparseable"
    assert judge("Question:\nAnswer: y", {**good, "instruction": ""}) == "empty"
    loop = {**good, "output": "it boils " * 12}
    assert judge("q", loop) == "repetitive"
    assert judge("q", {**good, "output": "purple elephants dancing"}) == "unsupported"
    assert judge("q", good) is None
    f.accept(good)
    assert judge("q", {**good, "instruction": "At what temperature does WATER boil"}) == "duplicate"
    long_q = "Explain in detail why water at sea level boils at exactly this temperature"
    f.accept({**good, "instruction": long_q, "output": "one hundred degrees Celsius, roughly"})
    # One different last word: 16 of 18 word 3-grams shared (Jaccard 0.89 >= 0.8).
    near = {**good, "instruction": long_q, "output": "one hundred degrees Celsius, about"}
    assert judge("q", near) == "near_duplicate"
    assert judge("q", {**good, "instruction": "Where is sea level measured from?"}) is None


def test_minhash_estimates_jaccard():
    a = " ".join(f"w{i}" for i in range(40))
    b = " ".join(f"w{i}" for i in range(39)) + " other"  # 37 of 39 shingles shared
    c = " ".join(f"x{i}" for i in range(40))
    assert minhash(a).jaccard(minhash(b)) > 0.85
    assert minhash(a).jaccard(minhash(c)) < 0.1
    assert normalize("Hello,   WORLD!") == "hello world"


# ------------------------------------------------------------------ sources


def test_documents_from_text_chunks_and_rows(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("First paragraph here.\n\nSecond one. It has two sentences.\n")
    (tmp_path / "blank.txt").write_text("\n \n")
    rows = tmp_path / "r.jsonl"
    rows.write_text('{"body": {"t": "row one"}}\n{"body": {"t": "  "}}\n')
    docs, blank = load_documents([str(tmp_path / "*.txt"), str(rows)], text_field="body.t")
    assert [d.id for d in docs] == [str(txt), f"{rows}:1"] and blank == 2
    docs, _ = load_documents([str(txt)], chunk_chars=25)
    assert [d.id for d in docs] == [f"{txt}#chunk0", f"{txt}#chunk1", f"{txt}#chunk2"]
    assert all(len(c) <= 10 for c in split_chunks("aaaa bbbb cccc dddd. eeee", 10))
    with pytest.raises(DataError, match=r"r.jsonl:1: no field 'text' \(--text-field\)"):
        load_documents([str(rows)])
    with pytest.raises(DataError, match="occurs twice"):
        load_documents([str(txt), str(txt)])


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def generated(bigram):
    """One CLI run over DOCS: (OUT, what it printed)."""
    root, model, docs, template = bigram
    out = root / "e2e" / "pairs.jsonl"
    printed, progress = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(progress):
        assert main([str(a) for a in gen_args(model, docs, template, out)]) == 0
    assert "generate: 14/14 docs (100%)" in progress.getvalue()  # not a tty: plain lines
    assert "docs/s, ETA" in progress.getvalue()
    return out, printed.getvalue()


def test_every_reason_end_to_end_and_counts(bigram, generated):
    _, _, _, template = bigram
    out, printed = generated
    rejected_path, stats_path = side_paths(out)
    stats = json.loads(stats_path.read_text())
    assert stats["rejected"] == EXPECTED
    assert stats["samples"] == {"generated": 28, "accepted": 8, "rejected": 20}
    assert stats["documents"]["done"] == 14 and stats["documents"]["with_pairs"] == 8
    assert "| rejected: near_duplicate |     2 |" in printed
    row, *rest = read_rows(out)
    assert [r["instruction"] for r in rest] == [f"x{i}" for i in EXTRA]
    assert row["instruction"] == " ".join(OK_Q) and row["output"] == " ".join(OK_A)
    assert row["provenance"]["source_id"] == "ok" and row["provenance"]["sample"] == 0
    assert row["provenance"]["sample_seed"] == sample_seed(0, "ok", 0)
    rejected = read_rows(rejected_path)
    counts = {r: sum(x["reason"] == r for x in rejected) for r in REASONS}
    assert counts == stats["rejected"]
    # The loop's reasons are the filters' own: replay every sample in order through them.
    order = {doc_id: i for i, (doc_id, _) in enumerate(DOCS)}
    texts = dict(DOCS)
    samples = sorted(
        [(r["provenance"], None, r) for r in read_rows(out)]
        + [(r["provenance"], r["reason"], r) for r in rejected],
        key=lambda s: (order[s[0]["source_id"]], s[0]["sample"]),
    )
    t = load_template(str(template))
    f = Filters(FilterConfig(require_support=True))
    for prov, reason, r in samples:
        text = r.get("text", "an accepted reply")
        pair = t.parse(text) if reason else {k: r[k] for k in ("instruction", "input", "output")}
        finish = r.get("finish", "eos")
        assert f.judge(text, finish, pair, texts[prov["source_id"]]) == reason
        if reason is None:
            f.accept(pair)


def test_output_is_instruction_data(bigram, generated, tmp_path):
    """The accepted rows read as ``data.format: instruction`` (the ``provenance`` key is
    ignored): the trained tokens of each example are exactly its generated output."""
    _, model, _, _ = bigram
    out, _ = generated
    cfg = load_config(
        write_config(
            tmp_path / "c.yaml", model, out, tmp_path / "run", train="{steps: 1, seq_len: 64}"
        )
    )
    tok = load_tokenizer(model)
    ds = build_datasets(cfg.data, tok, cfg.train.seq_len, use_cache=False)["train"]
    rows = [json.loads(line) for line in Path(out).read_text().splitlines()]
    assert ds.num_examples == len(rows) == 8
    for i, row in enumerate(rows):
        ids, mask = ds.example(i)
        trained = tok.decode(np.asarray(ids)[np.asarray(mask) > 0], skip_special_tokens=True)
        assert trained.split() == row["output"].split()


def test_resume_equals_an_uninterrupted_run(bigram, tmp_path):
    """Sampled at temperature 8 (the bigram's next token is likely, not certain), 8
    documents in batches of 4 x 2 samples; interrupted after one batch."""
    _, model, _, template = bigram
    docs = tmp_path / "docs.jsonl"
    triggers = [*CHAINS, "t_loop", "t_ok"]
    docs.write_text("".join(json.dumps({"text": f"w11 w12 {t}"}) + "\n" for t in triggers))

    def run(out, **kw):
        opts = dict(per_doc=2, max_new_tokens=32, temperature=8.0) | kw
        return generate_data(
            GenerateOptions(str(model), [str(docs)], str(out), str(template), **opts)
        )

    full = run(tmp_path / "full" / "o.jsonl")
    part = tmp_path / "part" / "o.jsonl"
    first = run(part, max_docs=4)
    assert first["documents"]["done"] == 4
    # A kill in the middle of writing the next batch: rows after the committed bytes.
    with open(side_paths(part)[0], "ab") as f:
        f.write(b'{"reason": "unparseable", "finish": "eos", "te')
    rest = run(part)
    for a, b in zip(side_paths(tmp_path / "full" / "o.jsonl"), side_paths(part), strict=True):
        if a.suffix == ".jsonl":
            assert a.read_bytes() == b.read_bytes()
    full_bytes = (tmp_path / "full" / "o.jsonl").read_bytes()
    assert full_bytes == part.read_bytes()
    assert {k: v for k, v in rest.items() if k != "seconds"} == {
        k: v for k, v in full.items() if k != "seconds"
    }
    assert full["samples"]["generated"] == 2 * len(triggers)
    again = run(part)  # all done: nothing generated, nothing appended
    assert again["samples"] == full["samples"] and part.read_bytes() == full_bytes
    assert len(set(full["rejected"].values())) > 2  # sampled: a mix of outcomes

    # Refusals leave every file as it was.
    files = [part, *side_paths(part)]
    before = [p.read_bytes() for p in files]
    with pytest.raises(ConfigError, match=r"other settings \(temperature: 8.0 then, 0.5 now\)"):
        run(part, temperature=0.5)
    with open(part, "ab") as f:
        f.write(b'{"instruction": "mine", "output": "a row I added"}\n')
    with pytest.raises(
        ConfigError, match="bytes after the last batch jaxtune recorded are not its rows"
    ):
        run(part)
    assert [p.read_bytes() for p in files[1:]] == before[1:]
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(ConfigError, match="is not a jaxtune data generate output"):
        run(foreign)
    assert foreign.read_text() == '{"instruction": "a", "output": "b"}\n'
    assert not side_paths(foreign)[1].exists()


def test_a_rows_sample_does_not_depend_on_its_batch(bigram):
    _, model, _, _ = bigram
    m, tok = from_pretrained(model), load_tokenizer(model)
    sampling = SamplingConfig(max_new_tokens=32, temperature=8.0)
    prompts = [tok(f"w11 {t}")["input_ids"] for t in [*CHAINS, "t_loop"]][:8]

    def first_row(others: list, seeds: list) -> list[int]:
        outs, _ = generate_ids(
            m, [prompts[0], *others], [3], sampling, 1, row_seeds=seeds, bucket=64
        )
        return outs[0]

    a = first_row(prompts[1:8], list(range(8)))
    assert a == first_row(prompts[7:0:-1], [0, *range(100, 107)])  # other rows, other seeds
    assert a != first_row(prompts[1:8], [5, *range(1, 8)])  # its own seed changes it


# ------------------------------------------------------------------ CLI errors


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--input", "{root}/nope.jsonl"], "error: {root}/nope.jsonl: --input not found"),
        (["--template", "poem"], "error: --template poem: expected qa, instruction or a .jinja"),
        (["--temperature", "-1"], "error: --temperature: got -1.0, expected a number >= 0"),
        (["--per-doc", "0"], "error: --per-doc: got 0, expected an integer >= 1"),
        (["--near-dup-threshold", "0"], "error: --near-dup-threshold: got 0.0, expected"),
        (["--text-field", "body"], "error: {docs}:1: no field 'body' (--text-field)"),
        (["--out", "{root}/x.txt"], "error: --out {root}/x.txt: expected a .jsonl file path"),
    ],
)
def test_cli_bad_input_is_one_line(bigram, capsys, extra, expected):
    root, model, docs, template = bigram
    args = gen_args(model, docs, template, root / "cli" / "o.jsonl")
    fmt = {"root": root, "docs": docs}
    for i in range(0, len(extra), 2):  # the later flag wins in argparse
        args += [extra[i], extra[i + 1].format(**fmt)]
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert line.startswith(expected.format(**fmt)), line
    assert not (root / "cli").exists()  # nothing written
