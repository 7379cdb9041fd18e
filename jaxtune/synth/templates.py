"""Prompt templates for ``jaxtune data generate`` and the parser of what a model answers.

A template is a jinja2 prompt that receives ``{{ document }}`` (the source text) and a
*layout*: the label that starts each field in the reply. ``qa`` asks for

    Question: ...
    Answer: ...

and ``instruction`` for ``Instruction: ... / Input: ... (optional) / Response: ...``. The
prompt goes through the model's chat template when the tokenizer has one (as
``jaxtune generate --chat`` renders it).

A user template is a ``.jinja`` file. It may start with a comment block declaring its
layout, one field per line, each with its labels (the first is the one to ask for,
the others are accepted too)::

    {#
    instruction: Question, Q
    output: Answer, A
    #}
    Write a quiz question about this text ... {{ document }}

``instruction`` and ``output`` are required, ``input`` is optional. Without the block
the layout is ``qa``'s.

Parsing (:meth:`Template.parse`) finds the labels at the start of a line, in any case,
also decorated as markdown or numbered (``**Question:**``, ``### Answer:``,
``1. Question:``, ``Question 1:``), or inside a line in their exact case after a space
(``... ? Answer: ...``, labels of two letters or more). A field's text runs to the next label; text before the first
label is ignored, and a second ``instruction`` label (the model starting another pair)
ends the reply. A reply without the instruction or the output label is ``unparseable``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
import jinja2.meta

from jaxtune.errors import ConfigError
from jaxtune.resources import resolve_path

FIELDS = ("instruction", "input", "output")

QA_PROMPT = """Read the passage below and write one question that the passage answers, \
then its answer.

Passage:
{{ document }}

Reply with exactly two lines:
Question: <the question>
Answer: <the answer>"""

INSTRUCTION_PROMPT = """Read the text below. Write one instruction that a user could give \
about it, and the ideal response. Add an input line only if the instruction needs extra \
text to work on.

Text:
{{ document }}

Reply in exactly this layout:
Instruction: <the instruction>
Input: <optional input>
Response: <the response>"""

QA_LAYOUT = {"instruction": ("Question", "Q"), "output": ("Answer", "A")}
INSTRUCTION_LAYOUT = {
    "instruction": ("Instruction", "Task"),
    "input": ("Input", "Context"),
    "output": ("Response", "Output", "Answer"),
}
BUILTIN = {"qa": (QA_PROMPT, QA_LAYOUT), "instruction": (INSTRUCTION_PROMPT, INSTRUCTION_LAYOUT)}

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
_DECOR = r"[*_`]*"


@dataclass(frozen=True)
class Template:
    """A prompt template and the layout of the reply it asks for.

    Attributes:
      name: ``qa``, ``instruction`` or the ``.jinja`` path as given.
      source: the jinja source of the prompt.
      layout: field -> accepted labels (``instruction`` and ``output`` always present).
    """

    name: str
    source: str
    layout: dict[str, tuple[str, ...]]

    @property
    def digest(self) -> str:
        """sha256 of the prompt and layout: a resumed run must use the same template."""
        text = self.source + repr(sorted(self.layout.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def prompt(self, document: str) -> str:
        """The prompt text for one document."""
        return _ENV.from_string(self.source).render(document=document)

    def parse(self, text: str) -> dict[str, str] | None:
        """``{"instruction", "input", "output"}`` from a reply, or None when unparseable.

        ``input`` is "" when the layout has none or the reply leaves it out. Values are
        stripped of whitespace and markdown emphasis; they may be empty (the ``empty``
        filter rejects those).
        """
        label_field = {lab.lower(): f for f, labs in self.layout.items() for lab in labs}
        alts = "|".join(re.escape(lab) for lab in sorted(label_field, key=len, reverse=True))
        at_line = re.compile(
            rf"^[ \t>#*_\-]*(?:\d+[.)][ \t]*)?{_DECOR}[ \t]*({alts})(?:[ \t]*\d+)?"
            rf"[ \t]*{_DECOR}[ \t]*[:：]{_DECOR}",
            re.IGNORECASE | re.MULTILINE,
        )
        # Inside a line only labels of two letters or more ("Option A:" is not an answer).
        exact = "|".join(
            re.escape(lab) for labs in self.layout.values() for lab in labs if len(lab) > 1
        )
        inline = re.compile(rf"(?<=\s){_DECOR}({exact}){_DECOR}:{_DECOR}")
        marks = sorted(
            {m.start(): m for rx in (at_line, inline) for m in rx.finditer(text)}.items()
        )
        # A line-start match also matches inline after a newline: keep the earliest start.
        kept, last_end = [], -1
        for start, m in marks:
            if start >= last_end:
                kept.append(m)
                last_end = m.end()
        fields: dict[str, str] = {}
        for i, m in enumerate(kept):
            field = label_field[m.group(1).lower()]
            if field in fields:
                break  # a second pair, or a repeated field: the first pair is the answer
            end = kept[i + 1].start() if i + 1 < len(kept) else len(text)
            fields[field] = _clean(text[m.end() : end])
        if "instruction" not in fields or "output" not in fields:
            return None
        return {f: fields.get(f, "") for f in FIELDS}


def _clean(value: str) -> str:
    return value.strip().strip("*_`").strip()


def _layout_block(source: str, where: str) -> tuple[dict[str, tuple[str, ...]], str]:
    """The layout declared in a leading ``{# ... #}`` comment (if any) and the source."""
    stripped = source.lstrip()
    if not stripped.startswith("{#"):
        return QA_LAYOUT, source
    end = stripped.find("#}")
    if end < 0:
        raise ConfigError(f"{where}: the comment block at the top is not closed with #}}")
    block = stripped[2:end].strip("-").strip()
    layout: dict[str, tuple[str, ...]] = {}
    for n, line in enumerate(block.splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, labels = line.partition(":")
        key = key.strip()
        labs = tuple(x.strip() for x in labels.split(",") if x.strip())
        if not sep or key not in FIELDS or not labs:
            raise ConfigError(
                f"{where}: layout line {n} {line.strip()!r}: expected 'FIELD: Label[, Alias]' "
                f"with FIELD one of {', '.join(FIELDS)}"
            )
        layout[key] = labs
    missing = [f for f in ("instruction", "output") if f not in layout]
    if missing:
        raise ConfigError(f"{where}: the layout block declares no {' or '.join(missing)} field")
    return layout, source


def load_template(spec: str) -> Template:
    """``qa``, ``instruction`` or a ``.jinja`` file -> :class:`Template`, checked.

    Raises:
      ConfigError: an unknown name, a missing file, a jinja syntax error, a template that
        never uses ``{{ document }}`` or a bad layout block.
    """
    if spec in BUILTIN:
        source, layout = BUILTIN[spec]
        return Template(spec, source, layout)
    if not spec.endswith(".jinja"):
        raise ConfigError(
            f"--template {spec}: expected qa, instruction or a .jinja file (PATH.jinja)"
        )
    path = Path(resolve_path(spec))
    if not path.is_file():
        raise ConfigError(f"--template {spec}: no such file")
    source = path.read_text(encoding="utf-8")
    layout, source = _layout_block(source, spec)
    try:
        parsed = _ENV.parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{spec}:{e.lineno}: jinja syntax error: {e.message}") from None
    if "document" not in jinja2.meta.find_undeclared_variables(parsed):
        raise ConfigError(f"--template {spec}: the template never uses {{{{ document }}}}")
    return Template(spec, source, layout)
