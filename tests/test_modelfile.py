"""The Ollama ``Modelfile`` beside a GGUF export (``jaxtune.export.modelfile``).

The Go template is checked by rendering it, with a renderer for exactly the subset the
module writes, as Ollama's legacy (one-turn) path executes it: once per past turn, the
last cut after ``{{ .Response }}``. Its renders must equal the jinja chat template's
(less a leading BOS when llama.cpp adds one): the generation prompt with and without a
system message, an answered turn through its terminator, and for templates that a
one-turn template can express exactly, a whole multi-turn conversation. Tokenizers: the
real SmolLM2 one (ChatML) and small real tokenizers built here under Gemma 3's template
(jaxtune's own), a Llama 3 style one, a Mistral style one that rejects a system message,
one that drops it, and one whose text holds Go template braces.
"""

from __future__ import annotations

import re

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from jaxtune.errors import ExportError
from jaxtune.export.modelfile import modelfile_text
from jaxtune.gguf.gemma import CHAT_TEMPLATE as GEMMA3_TEMPLATE
from jaxtune.loading import load_tokenizer

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# Silently skips system messages.
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# Go template delimiters in the template's own text: "{{{", "}}}" and a "{" right before
# each message's content (so before a Go field).
BRACES_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|turn|>{{{' + message['role'] + '}}}{' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|turn|>{{{assistant}}}{' }}{% endif %}"
)

# Message contents of the conversations compared. A Go field writes its value as it is,
# braces included.
SYSTEM = "Answer in one word."
USER = "What is {{ 2 + 2 }}?"
REPLY = "Four."
USER2 = "And 3 + 3?"


def small_tokenizer(template, bos, eos, specials=(), add_bos=False):
    """A real fast tokenizer: one token per ASCII character, plus the special tokens."""
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    tokens = [bos, eos, *specials]
    vocab = {t: i for i, t in enumerate(tokens + chars)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[])),
        bos_token=bos,
        eos_token=eos,
        additional_special_tokens=list(specials),
        add_bos_token=add_bos,
    )
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


def gemma():
    specials = ["<start_of_turn>", "<end_of_turn>"]
    return small_tokenizer(GEMMA3_TEMPLATE, "<bos>", "<eos>", specials, add_bos=True)


def llama3():
    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    return small_tokenizer(LLAMA3_TEMPLATE, bos, eos, specials, add_bos=True)


def mistral():
    return small_tokenizer(MISTRAL_TEMPLATE, "<s>", "</s>", add_bos=True)


def no_system():
    specials = ["<|user|>", "<|assistant|>", "<|end|>"]
    return small_tokenizer(NO_SYSTEM_TEMPLATE, "<s>", "</s>", specials)


def braces():
    return small_tokenizer(BRACES_TEMPLATE, "<s>", "</s>", ["<|turn|>", "<|end|>"])


# ------------------------------------------------------- the Modelfile and its Go template

_TEMPLATE = re.compile(r'^TEMPLATE """(.*?)"""$', re.S | re.M)
_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)


def parts(text):
    """(template, stop strings) read from a Modelfile as Ollama's parser reads them."""
    (template,) = _TEMPLATE.findall(text)
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    return template, stops


def go_render(template, system="", prompt="", response="", cut=False):
    """``template`` executed as Go's text/template would, for the subset the module writes.

    ``cut``: stop at ``{{ .Response }}``, as Ollama does for the turn being generated.
    """
    values = {".System": system, ".Prompt": prompt, ".Response": response}
    out, emitting, pos = [], [], 0  # emitting: one flag per open {{ if }}
    for m in _ACTION.finditer(template):
        on = all(emitting)
        if on:
            out.append(template[pos : m.start()])
        pos = m.end()
        action = m.group(1).strip()
        if action == "if .System":
            emitting.append(bool(system))
        elif action == "else":
            emitting[-1] = not emitting[-1]
        elif action == "end":
            emitting.pop()
        elif action == ".Response" and cut:
            assert not emitting
            return "".join(out)
        elif action in values:
            out.append(values[action] if on else "")
        elif action in ('"{{"', '"{"'):
            out.append(action[1:-1] if on else "")
        else:
            raise AssertionError(f"unexpected Go action {m.group(0)!r}")
    assert not emitting, "unclosed {{ if }}"
    out.append(template[pos:])
    return "".join(out)


def ollama_prompt(template, messages):
    """Ollama's legacy prompt: the template once per turn, the last cut after .Response.

    As ``Template.Execute`` in ollama's template/template.go for templates without
    ``.Messages``: a turn is (system, user, assistant); a new user message after a reply
    starts the next one.
    """
    out, system, prompt, response = [], "", "", ""
    for m in messages:
        role, content = m["role"], m["content"]
        if (role == "user" and response) or (role == "system" and (prompt or response)):
            out.append(go_render(template, system, prompt, response))
            system = prompt = response = ""
        if role == "system":
            system = content
        elif role == "user":
            prompt = content
        else:
            response = content
    out.append(go_render(template, system, prompt, response, cut=True))
    return "".join(out)


def jinja(tok, messages, generation, add_bos):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    if add_bos and text.startswith(tok.bos_token):
        text = text[len(tok.bos_token) :]
    return text


# -------------------------------------------------------------------------------- tests

CASES = {
    # name: (tokenizer, takes a system message, stop strings)
    "gemma3": (gemma, True, ["<end_of_turn>", "<eos>"]),
    "llama3": (llama3, True, ["<|eot_id|>", "<|end_of_text|>"]),
    "mistral": (mistral, False, ["</s>"]),
    "no_system": (no_system, False, ["<|end|>", "</s>"]),
    "braces": (braces, True, ["<|end|>", "</s>"]),
}


@pytest.mark.parametrize("name", ["smollm2", *CASES])
def test_go_template_renders_as_the_chat_template(name, smollm2):
    if name == "smollm2":
        tok, takes_system, stops = smollm2, True, ["<|im_end|>"]
    else:
        make, takes_system, stops = CASES[name]
        tok = make()
    add_bos = bool(getattr(tok, "add_bos_token", False))
    text = modelfile_text(tok, "model-Q8_0.gguf")
    assert text.splitlines()[0] == "FROM ./model-Q8_0.gguf"
    template, stop_lines = parts(text)
    assert stop_lines == stops

    user = [{"role": "user", "content": USER}]
    assert go_render(template, prompt=USER, cut=True) == jinja(tok, user, True, add_bos)
    with_system = [{"role": "system", "content": SYSTEM}, *user]
    if takes_system:
        assert "{{ if .System }}" in template
        assert go_render(template, SYSTEM, USER, cut=True) == jinja(tok, with_system, True, add_bos)
    else:
        assert ".System" not in template
        assert "# The chat template takes no system message" in text
    # An answered turn, as Ollama writes a past one: through the terminator and the
    # whitespace after it (all these templates write after a reply).
    answered = [*user, {"role": "assistant", "content": REPLY}]
    past = go_render(template, prompt=USER, response=REPLY)
    assert past == jinja(tok, answered, False, add_bos)
    assert past.rstrip().endswith(stops[0])


@pytest.mark.parametrize(
    ("name", "system"), [(n, s) for n, c in CASES.items() for s in (False, True) if c[1] or not s]
)
def test_ollama_multi_turn_prompt_is_the_chat_template(name, system):
    # Not SmolLM2: Ollama repeats its default system prompt before each later user turn
    # (the template writes it before a first user turn without a system message).
    tok = CASES[name][0]()
    messages = [
        *([{"role": "system", "content": SYSTEM}] if system else []),
        {"role": "user", "content": USER},
        {"role": "assistant", "content": REPLY},
        {"role": "user", "content": USER2},
    ]
    template, _ = parts(modelfile_text(tok, "m.gguf"))
    assert ollama_prompt(template, messages) == jinja(tok, messages, True, tok.add_bos_token)


def test_smollm2_modelfile(smollm2):
    text = modelfile_text(smollm2, "SmolLM2-Q8_0.gguf")
    template, stops = parts(text)
    # SmolLM2 writes no BOS and its EOS is its terminator: one stop.
    assert stops == ["<|im_end|>"]
    assert template.startswith("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>")
    assert template.endswith("{{ end }}{{ .Response }}<|im_end|>\n")
    # Its default system prompt, written when there is no system message.
    assert "{{ else }}<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in template


def test_bos_is_left_to_llama_cpp_when_it_adds_one():
    tok = gemma()
    for add_bos, starts in ((True, "<start_of_turn>"), (False, "<bos><start_of_turn>")):
        template, _ = parts(modelfile_text(tok, "m.gguf", add_bos=add_bos))
        assert go_render(template, prompt=USER, cut=True).startswith(starts)
        assert go_render(template, SYSTEM, USER, cut=True).startswith(starts)


def test_go_template_escapes_braces():
    template, _ = parts(modelfile_text(braces(), "m.gguf"))
    assert '{{ "{{" }}' in template and '{{ "{" }}{{ .Prompt }}' in template
    assert "{{{" not in template


def test_no_chat_template_is_raw_completion():
    tok = small_tokenizer(None, "<s>", "</s>", add_bos=True)
    text = modelfile_text(tok, "m.gguf")
    lines = text.splitlines()
    assert lines[0] == "FROM ./m.gguf"
    assert any(line.startswith("# ") and "no chat template" in line for line in lines)
    template, stops = parts(text)
    assert template == "{{ .Prompt }}"
    assert stops == ["</s>"]


def test_triple_quotes_are_refused():
    template = '{{ \'Say """hi""". \' }}' + NO_SYSTEM_TEMPLATE
    tok = small_tokenizer(template, "<s>", "</s>", ["<|user|>", "<|assistant|>", "<|end|>"])
    with pytest.raises(ExportError, match='"""'):
        modelfile_text(tok, "m.gguf")


def test_gguf_name_must_be_a_file_name():
    with pytest.raises(ExportError, match="not a file name"):
        modelfile_text(mistral(), "out/m.gguf")
