"""Rendering rows into token ids and loss masks, one encoder per ``data.format``.

Every encoder turns a batch of :class:`~jaxtune.data.loaders.Record` into
:class:`Encoded` examples (or a :class:`~jaxtune.data.loaders.RowError` per bad row):
``ids`` are the example's tokens and ``mask[t] == 1`` means token ``t`` is trained on as
a target (predicted from position ``t - 1``).

How the trained part is found (never by tokenizing the response on its own and
searching for it, which breaks when tokens merge across the boundary):

* instruction / completion: the prompt and prompt + response are tokenized, and the
  prompt's tokens must be a prefix of the full tokens (checked; an error otherwise). The
  response tokens plus the appended EOS are trained.
* chat: when the chat template has ``{% generation %}`` markers, transformers' assistant
  mask is used. Otherwise the conversation is rendered up to each assistant turn (with the
  generation prompt) and through it, and the tokens between the two prefixes are that
  turn's mask. Either way each assistant span must contain the turn's stop token; tokens
  the template adds after it (a newline) are not trained, since the model never generates
  them.

* preference: a prompt and two completions, each side tokenized as prompt + completion
  with the prompt's tokens as a checked prefix (:mod:`jaxtune.data.preference`).

The base class and shared pieces are in :mod:`jaxtune.data.encoding`; chat rendering and
the chat pre-flight checks (one BOS, a trained turn terminator) in :mod:`jaxtune.data.chat`.
"""

from __future__ import annotations

from typing import Any

from jaxtune.data.chat import ChatEncoder
from jaxtune.data.config import DataConfig
from jaxtune.data.encoding import Encoded, Encoder, prefix_error
from jaxtune.data.loaders import Record, RowError, _one_line
from jaxtune.data.preference import PreferenceEncoder
from jaxtune.errors import DataError

TEMPLATES = {
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    ),
    "plain": ("{instruction}\n", "{instruction}\n{input}\n"),
}
"""Built-in instruction templates: name -> (without input, with input). ``chat`` renders
the instruction as a user turn with the tokenizer's chat template instead."""


class PromptResponseEncoder(Encoder):
    """``instruction`` and ``completion``: a prompt, then a trained response + EOS."""

    def __init__(self, cfg: DataConfig, tokenizer, label_names=None):
        super().__init__(cfg, tokenizer, label_names)
        if cfg.format == "instruction" and cfg.template not in TEMPLATES:
            if "{instruction}" not in cfg.template:
                raise DataError(
                    f"data.template = {_one_line(cfg.template)}: expected a built-in name "
                    f"({', '.join([*TEMPLATES, 'chat'])}) or a string containing {{instruction}}"
                )

    def double_bos_cause(self, name: str) -> str:
        if self.cfg.format == "completion":
            where = f"field {self.cfg.fields.get('prompt', 'prompt')!r}"
        elif self.cfg.template not in TEMPLATES and self.cfg.template.lstrip().startswith(name):
            where = "data.template"
        else:
            where = f"field {self.cfg.fields.get('instruction', 'instruction')!r}"
        return (
            f"the prompt text already starts with {name} and the tokenizer adds another; "
            f"remove {name} from {where} (the tokenizer writes BOS itself)"
        )

    def prompt_response(self, rec: Record) -> tuple[str, str]:
        """The prompt text and the response text of a record."""
        if self.cfg.format == "completion":
            return self.field(rec, "prompt"), self.field(rec, "completion")
        instruction = self.field(rec, "instruction")
        inp = self.field(rec, "input") or ""
        output = self.field(rec, "output")
        if self.cfg.template in TEMPLATES:
            template = TEMPLATES[self.cfg.template][bool(inp)]
        else:
            template = self.cfg.template
            if inp and "{input}" not in template:
                instruction = f"{instruction}\n\n{inp}"
        # str.replace, not str.format: the template may contain other braces (JSON, code).
        prompt = template.replace("{instruction}", instruction).replace("{input}", inp)
        return prompt, output

    def encode_batch(self, records):
        out: list[Any] = [None] * len(records)
        pairs = []
        for i, rec in enumerate(records):
            try:
                pairs.append((i, *self.prompt_response(rec)))
            except RowError as e:
                out[i] = e
        prompts = self.tokenize([p for _, p, _ in pairs], special=True)
        fulls = self.tokenize([p + r for _, p, r in pairs], special=True)
        for (i, _, _), p_ids, f_ids in zip(pairs, prompts, fulls, strict=True):
            if f_ids[: len(p_ids)] != p_ids:
                out[i] = prefix_error(records[i].source, self.tok, p_ids, f_ids)
                continue
            try:
                self.check_bos(records[i], f_ids)
            except RowError as e:
                out[i] = e
                continue
            ids = self.with_eos(f_ids)
            if self.cfg.train_on_inputs:
                mask = [1] * len(ids)
            else:
                mask = [0] * len(p_ids) + [1] * (len(ids) - len(p_ids))
            out[i] = Encoded(ids, mask)
        return out


class TextEncoder(Encoder):
    """``text``: documents with BOS (if the tokenizer adds one) and EOS, all trained.

    Plain-text files arrive as blocks of one document (``_last`` marks the final block);
    BOS goes on the first block and EOS on the last. Chunking to ``seq_len`` happens in
    the dataset builder, which concatenates the blocks.
    """

    def __init__(self, cfg, tokenizer, label_names=None):
        super().__init__(cfg, tokenizer, label_names)
        self._doc_open = False

    def encode_batch(self, records):
        out: list[Any] = [None] * len(records)
        texts = []
        for i, rec in enumerate(records):
            try:
                texts.append((i, self.field(rec, "text")))
            except RowError as e:
                out[i] = e
        for (i, _), ids in zip(texts, self.tokenize([t for _, t in texts], False), strict=True):
            last = bool(records[i].row.get("_last", True))
            if not self._doc_open:
                ids = self.bos + ids
            ids = self.with_eos(ids) if last else ids
            self._doc_open = not last
            out[i] = Encoded(ids, [1] * len(ids), doc_end=last)
        return out


class ClassificationEncoder(Encoder):
    """``classification``: text tokens (no trained targets) and a class id."""

    def encode_batch(self, records):
        out: list[Any] = [None] * len(records)
        items = []
        label_col = self.cfg.fields.get("label", "label")
        for i, rec in enumerate(records):
            try:
                text = self.field(rec, "text")
                label = self.label_map(self.field(rec, "label", kind=object), rec.source, label_col)
                items.append((i, text, label))
            except RowError as e:
                out[i] = e
        for (i, _, label), ids in zip(
            items, self.tokenize([t for _, t, _ in items], True), strict=True
        ):
            if self.cfg.add_eos and self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
                ids = ids + [self.eos_id]
            out[i] = Encoded(ids, [0] * len(ids), label=label)
        return out


def make_encoder(cfg: DataConfig, tokenizer, label_names: list[str] | None = None) -> Encoder:
    """The encoder for ``cfg.format`` (``instruction`` with ``template: chat`` uses chat)."""
    if cfg.format == "chat" or (cfg.format == "instruction" and cfg.template == "chat"):
        return ChatEncoder(cfg, tokenizer, label_names)
    if cfg.format in ("instruction", "completion"):
        return PromptResponseEncoder(cfg, tokenizer, label_names)
    if cfg.format == "text":
        return TextEncoder(cfg, tokenizer, label_names)
    if cfg.format == "classification":
        if label_names is None:
            raise DataError("classification needs label names (data.labels or from data.train)")
        return ClassificationEncoder(cfg, tokenizer, label_names)
    if cfg.format == "preference":
        return PreferenceEncoder(cfg, tokenizer, label_names)
    raise DataError(
        f"data.format = {cfg.format!r}; expected instruction, chat, completion, text, "
        "classification or preference"
    )


def classification_ids(tokenizer, texts: list[str], add_eos: bool = True) -> list[list[int]]:
    """The token ids jaxtune's data pipeline feeds a classifier for ``texts``.

    The ``classification`` format's encoder itself (the tokenizer's own specials such as
    BOS, and EOS appended unless ``add_eos`` is false); untruncated. Exports and the bias
    probe score texts outside a dataset with it.
    """
    enc = make_encoder(DataConfig(format="classification", add_eos=add_eos), tokenizer, ["x"])
    rows = [Record(f"probe[{i}]", i, {"text": t, "label": "x"}) for i, t in enumerate(texts)]
    return [e.ids for e in enc.encode_batch(rows)]


def prompt_chat_template(cfg: DataConfig) -> str | None:
    """A jinja chat template that renders a conversation the way this data was trained.

    For ``instruction`` data with a text template (``alpaca``, ``plain``, a custom string)
    and ``completion`` data, the tokenizer's own chat template is not what the model
    learned: a user turn becomes the instruction template filled with its content (no
    input), an assistant turn its content followed by EOS (``data.add_eos``). System turns
    are dropped (text templates have no place for them). None for ``chat`` data and any
    other format: the tokenizer's template is the trained one.

    Raises:
        DataError: the template text contains ``{% endraw %}`` (it cannot be quoted).
    """
    if cfg.format == "completion":
        prefix, suffix = "", ""
    elif cfg.format == "instruction" and cfg.template != "chat":
        template = TEMPLATES[cfg.template][0] if cfg.template in TEMPLATES else cfg.template
        prefix, _, suffix = template.replace("{input}", "").partition("{instruction}")
    else:
        return None
    if "endraw" in prefix + suffix:
        raise DataError("data.template contains 'endraw', which a chat template cannot quote")

    def raw(text: str) -> str:  # the template's text, never read as jinja syntax
        return "{% raw %}" + text + "{% endraw %}" if text else ""

    eos = "{{ eos_token }}" if cfg.add_eos else ""
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        f"{raw(prefix)}{{{{ message['content'] }}}}{raw(suffix)}"
        "{% elif message['role'] == 'assistant' %}"
        f"{{{{ message['content'] }}}}{eos}"
        "{% endif %}"
        "{% endfor %}"
    )
