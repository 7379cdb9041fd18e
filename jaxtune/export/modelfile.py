"""The Ollama ``Modelfile`` written beside a GGUF export, so that
``ollama create NAME -f Modelfile`` gives a model that chats with its chat template.

Ollama formats prompts with Go templates, not jinja. The jinja chat template is converted
generically, never from a per-model list: it is rendered with placeholder contents for a
(system, user) turn and a (user) turn with the generation prompt, and a (user, assistant)
conversation, and the placeholders become ``{{ .System }}``, ``{{ .Prompt }}`` and
``{{ .Response }}`` of Ollama's one-turn ("legacy") template::

    {{ if .System }}<system, user render>{{ else }}<user render>{{ end }}{{ .Response }}<suffix>

The suffix is what the template writes after an assistant's content: its turn terminator
and the whitespace after it (``<|im_end|>\\n``). Ollama executes this template once per
past turn and cuts the last one after ``{{ .Response }}``, so the first turn's prompt is
exactly the jinja render; later turns repeat what the template writes before any first
user turn (a default system prompt such as SmolLM2's), which a one-turn template cannot
avoid.
"""

from __future__ import annotations

import re

from jaxtune.data.chat import turn_terminator
from jaxtune.errors import ExportError

# Placeholder message contents: ASCII letters and digits only, so that templates which
# trim, concatenate or capitalise-check contents leave them whole, and unlikely to occur
# in any template's own text.
_SYSTEM = "JXTsystemQ7v2k"
_PROMPT = "JXTpromptQ7v2k"
_RESPONSE = "JXTresponseQ7v2k"
_FIELDS = {_SYSTEM: "{{ .System }}", _PROMPT: "{{ .Prompt }}", _RESPONSE: "{{ .Response }}"}
_PLACEHOLDER = re.compile(f"({_SYSTEM}|{_PROMPT}|{_RESPONSE})")

_NO_TEMPLATE = (
    "# The tokenizer has no chat template: raw completion, the prompt is passed to the "
    "model as it is."
)
_NO_SYSTEM = (
    "# The chat template takes no system message: a system prompt (SYSTEM, a system "
    "message) is ignored."
)


def modelfile_text(tokenizer, gguf_name: str, *, add_bos: bool | None = None) -> str:
    """The text of an Ollama ``Modelfile`` for ``gguf_name``, a GGUF file beside it.

    It holds ``FROM ./<gguf_name>`` (first), a ``TEMPLATE`` converted from the tokenizer's
    jinja chat template (see the module docstring) and ``PARAMETER stop`` lines for the
    turn terminator (:func:`jaxtune.data.chat.turn_terminator`) and EOS. A template that
    rejects or drops a system message gets the user-only form and ignores ``.System``; a
    tokenizer without a chat template gets ``{{ .Prompt }}`` (raw completion) and a stop
    on EOS. Each case is said in a ``#`` comment line.

    Args:
      tokenizer: the HF tokenizer (``chat_template``, ``bos_token``, ``eos_token``).
      gguf_name: the GGUF file's name, in the Modelfile's directory.
      add_bos: whether llama.cpp adds BOS to the prompt (the GGUF's
        ``tokenizer.ggml.add_bos_token``); a BOS the template writes first is then left
        out of the Go template, else the model would see two. Default: the tokenizer's
        ``add_bos_token`` (False when it has none).

    Returns:
      The Modelfile's text, ending with a newline.

    Raises:
      ExportError: ``gguf_name`` is not a plain file name; the chat template cannot render
        a user turn or a user and assistant conversation, or drops their contents; the
        rendered template or a stop string holds what a Modelfile cannot quote (three
        double quotes in the template, characters Ollama's parser drops).
      DataError: jinja2, which renders chat templates, is not installed.
    """
    if not gguf_name or any(c in gguf_name for c in "/\\\r\n"):
        raise ExportError(f"Modelfile: {gguf_name!r} is not a file name (FROM ./<name>)")
    if add_bos is None:
        add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    lines = [f"FROM ./{gguf_name}"]
    eos = tokenizer.eos_token
    if not tokenizer.chat_template:
        lines += [_NO_TEMPLATE, 'TEMPLATE """{{ .Prompt }}"""']
        stops = [eos] if eos else []
    else:
        terminator = turn_terminator(tokenizer)  # first: it reports a missing jinja2
        stop = None if terminator is None else tokenizer.decode([terminator])
        template, takes_system = _go_template(tokenizer, stop, add_bos)
        if not takes_system:
            lines.append(_NO_SYSTEM)
        lines.append(f'TEMPLATE """{template}"""')
        stops = [s for s in (stop, eos) if s]
        stops = list(dict.fromkeys(stops))  # EOS only when it differs from the terminator
    lines += [f"PARAMETER stop {_quoted(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def _go_template(tokenizer, stop: str | None, add_bos: bool) -> tuple[str, bool]:
    """The Go template and whether it uses ``.System`` (see the module docstring)."""
    bos = tokenizer.bos_token if add_bos else None
    user = [{"role": "user", "content": _PROMPT}]
    try:
        with_system = _render(tokenizer, [{"role": "system", "content": _SYSTEM}, *user], True)
    except ImportError:
        raise
    except Exception:  # a template that rejects a system role (Mistral's, Gemma 2's)
        with_system = None
    if with_system is not None and _SYSTEM not in with_system:
        with_system = None  # a template that drops it: .System would be ignored anyway
    try:
        user_only = _render(tokenizer, user, True)
        turn = _render(tokenizer, [*user, {"role": "assistant", "content": _RESPONSE}], False)
    except ImportError:
        raise
    except Exception as e:
        raise ExportError(
            f"Modelfile: the chat template cannot render a user turn and an assistant "
            f"reply ({type(e).__name__}: {e}); no Ollama template can be derived from it"
        ) from None
    for text, holds in ((user_only, _PROMPT), (with_system, _PROMPT), (turn, _RESPONSE)):
        if text is not None and holds not in text:
            raise ExportError(
                "Modelfile: the chat template drops the message contents it is given; no "
                "Ollama template can be derived from it"
            )
    suffix = turn[turn.rfind(_RESPONSE) + len(_RESPONSE) :]
    if stop and stop in suffix:
        # Up to the terminator and the whitespace after it: what separates this turn
        # from the next. Anything later is written only at the conversation's end.
        end = suffix.index(stop) + len(stop)
        rest = suffix[end:]
        suffix = suffix[: end + len(rest) - len(rest.lstrip())]
    user_only = _go(_strip_bos(user_only, bos))
    body = user_only
    if with_system is not None:
        system = _go(_strip_bos(with_system, bos))
        body = "{{ if .System }}" + system + "{{ else }}" + user_only + "{{ end }}"
    template = body + "{{ .Response }}" + _go(suffix)
    if '"""' in template:
        raise ExportError(
            'Modelfile: the rendered chat template holds """, which ends a Modelfile\'s '
            "TEMPLATE block; the template cannot be written for Ollama"
        )
    _check_printable(template, "the rendered chat template")
    return template, with_system is not None


def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _strip_bos(text: str, bos: str | None) -> str:
    # llama.cpp (and so Ollama) writes BOS itself when the GGUF says add_bos_token.
    return text[len(bos) :] if bos and text.startswith(bos) else text


def _go(text: str) -> str:
    """``text`` as Go template text: placeholders become fields, literal braces escaped."""
    parts = []
    for k, piece in enumerate(_PLACEHOLDER.split(text)):
        parts.append(_FIELDS[piece] if k % 2 else _escape(piece))
    return "".join(parts)


def _escape(literal: str) -> str:
    # "{{" opens an action in Go templates; a lone "{" at the end would join the "{{" of
    # the action after it into "{{{".
    out = literal.replace("{{", '{{ "{{" }}')
    if out.endswith("{"):
        out = out[:-1] + '{{ "{" }}'
    return out


def _check_printable(text: str, what: str) -> None:
    # Ollama's Modelfile parser drops every other unprintable character from a value.
    bad = sorted({c for c in text if not (c.isprintable() or c in "\n\r\t")})
    if bad:
        raise ExportError(
            f"Modelfile: {what} holds characters Ollama's Modelfile parser drops "
            f"({', '.join(f'U+{ord(c):04X}' for c in bad)}); it cannot be written for Ollama"
        )


def _quoted(stop: str) -> str:
    """A stop string as a Modelfile value: ``"<stop>"``.

    Ollama takes a double-quoted value as the text between its first and last quote,
    with no escapes (a JSON escape would stay in the stop string).
    """
    if "\n" in stop or "\r" in stop or stop.startswith('""'):
        raise ExportError(f"Modelfile: the stop string {stop!r} cannot be quoted for Ollama")
    _check_printable(stop, f"the stop string {stop!r}")
    return f'"{stop}"'
