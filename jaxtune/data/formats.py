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

Pre-flight checks (each a one-line :class:`DataError` naming file and line), aimed at the
two most common silent failures of chat fine-tuning:

* **one BOS.** A chat/instruction/completion example starts with exactly one BOS when the
  tokenizer writes one before text (Llama, Mistral, Gemma), and with at most one when it
  does not (Qwen2, SmolLM2). Two (a prompt or template that already holds BOS, plus the
  tokenizer's) is an error. A chat template that writes no BOS for a tokenizer that uses
  one (TinyLlama's) gets the tokenizer's BOS in front, as ``tokenizer(rendered_text)``
  would give.
* **the turn terminator is trained.** The token the chat template writes right after an
  assistant's content (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``, EOS) is found by
  rendering a probe conversation (:func:`turn_terminator`), never from a per-model list,
  and must be inside every assistant turn's loss mask, else the model never learns to
  stop. Padding never removes it: masks, not token ids, mark padding, so a tokenizer whose
  pad token is its EOS (SmolLM2) still trains on the real EOS.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from jaxtune.data.config import DataConfig
from jaxtune.data.loaders import Record, RowError, _one_line, get_field
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

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class Encoded:
    """One tokenized example.

    Attributes:
      ids: token ids, untruncated.
      mask: same length; 1 where the token is a trained target.
      label: class id (classification), else -1.
      doc_end: for ``text`` blocks, whether this block ends its document.
    """

    ids: list[int]
    mask: list[int]
    label: int = -1
    doc_end: bool = True


def canonical_fields(fmt: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) canonical field names of a format."""
    return {
        "instruction": (("instruction", "output"), ("input",)),
        "chat": (("messages",), ()),
        "completion": (("prompt", "completion"), ()),
        "text": (("text",), ()),
        "classification": (("text", "label"), ()),
    }[fmt]


class LabelMap:
    """Maps label values (names, or integer ids) to class ids.

    A value is looked up by name first (``str(value)``), then as an integer id in range,
    so both ``"positive"`` and ``1`` work for names ``["negative", "positive"]``.
    """

    def __init__(self, names: list[str]):
        self.names = list(names)
        self._index = {n: i for i, n in enumerate(self.names)}

    def __call__(self, value: Any, source: str, column: str) -> int:
        key = str(value)
        if key in self._index:
            return self._index[key]
        try:
            as_int = int(key)
        except ValueError:
            as_int = None
        if as_int is not None and 0 <= as_int < len(self.names) and not isinstance(value, float):
            return as_int
        raise RowError(
            source,
            "label not in label set",
            f"field {column!r} = {_one_line(key)} is not in the label set {self.names} "
            "(data.labels); expected one of those names or an id below "
            f"{len(self.names)}",
        )


def derive_label_names(values: list[Any]) -> list[str]:
    """Sorted unique label names: numerically when all values are integers."""
    uniq = {str(v) for v in values}
    try:
        return sorted(uniq, key=int)
    except ValueError:
        return sorted(uniq)


def auto_eos(tokenizer) -> bool:
    """Whether the tokenizer appends EOS to every text by itself."""
    eos = tokenizer.eos_token_id
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(eos is not None and full and full[-1] == eos and not (bare and bare[-1] == eos))


def bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer writes before every text (its BOS), or [] if none.

    Chat templates are rendered to text and tokenized without special tokens; a template
    that writes no BOS of its own then gets this prefix, as ``tokenizer(rendered)`` would.
    """
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    if auto_eos(tokenizer):
        full = full[:-1]
    return full[: len(full) - len(bare)] if full[len(full) - len(bare) :] == bare else []


class Encoder:
    """Base class: field lookup, tokenization and shared bookkeeping.

    Attributes:
      stats: counters updated while encoding (``missing_fields``, ``empty_fields``).
    """

    def __init__(self, cfg: DataConfig, tokenizer, label_names: list[str] | None = None):
        self.cfg = cfg
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.label_map = LabelMap(label_names) if label_names is not None else None
        self.stats: dict[str, Counter] = {"missing_fields": Counter(), "empty_fields": Counter()}
        required, optional = canonical_fields(cfg.format)
        self.required, self.optional = required, optional
        unknown = set(cfg.fields) - set(required) - set(optional) - {"role", "content"}
        if unknown:
            raise DataError(
                f"data.fields: unknown field(s) {sorted(unknown)} for format {cfg.format!r}; "
                f"expected some of {list(required + optional)}"
            )
        if cfg.add_eos and self.eos_id is None and cfg.format != "classification":
            raise DataError(
                "data.add_eos is true but the tokenizer has no EOS token; set data.add_eos=false"
            )
        # Some tokenizers append EOS themselves; it is stripped and re-added explicitly so
        # an example never carries two EOS tokens.
        self.auto_eos = auto_eos(tokenizer)
        # What the tokenizer puts before the text (BOS), reused when chunking documents.
        self.bos = bos_prefix(tokenizer)
        # The BOS id counted by check_bos: the one the tokenizer writes, else its declared
        # BOS (which a chat template may still write, as SmolLM2's <|im_start|>).
        self.bos_id = self.bos[0] if len(self.bos) == 1 else tokenizer.bos_token_id

    def double_bos_cause(self, name: str) -> str:
        """Where a second BOS ``name`` comes from, and the fix (per format)."""
        return f"expected one; remove {name} from the data (the tokenizer writes BOS itself)"

    def check_bos(self, rec: Record, ids: list[int]) -> None:
        """Raises unless ``ids`` starts with exactly one BOS (at most one for tokenizers
        that write none, such as Qwen2's and SmolLM2's)."""
        if self.bos_id is None:
            return
        n = 0
        while n < len(ids) and ids[n] == self.bos_id:
            n += 1
        if n == 1 or (n == 0 and not self.bos):
            return
        name = self.tok.convert_ids_to_tokens([self.bos_id])[0]
        if n == 0:
            detail = f"no BOS token ({name}) at the start; expected one: the tokenizer writes it before text"
        else:
            detail = f"{n} BOS tokens ({name}) at the start: {self.double_bos_cause(name)}"
        raise RowError(rec.source, "BOS count", detail)

    def field(self, rec: Record, name: str, kind: type = str) -> Any:
        """A canonical field of a row, through ``data.fields``; None if optional and absent."""
        column = self.cfg.fields.get(name, name)
        try:
            value = get_field(rec.row, column)
        except KeyError:
            value = None
        if value is None:
            if name in self.optional:
                self.stats["missing_fields"][name] += 1
                return None
            raise RowError(
                rec.source,
                "missing field",
                f"missing field {column!r} ({self.cfg.format} format reads "
                f"{', '.join(self.required)}; remap with data.fields)",
            )
        if kind is str and not isinstance(value, str):
            raise RowError(
                rec.source,
                "wrong type",
                f"field {column!r} is {type(value).__name__} {_one_line(value, 40)}; "
                "expected a string",
            )
        if isinstance(value, str | list) and not value:
            self.stats["empty_fields"][name] += 1
        return value

    def tokenize(self, texts: list[str], special: bool) -> list[list[int]]:
        """Batched tokenization; with ``special`` the tokenizer's BOS etc. are added."""
        if not texts:
            return []
        out = self.tok(texts, add_special_tokens=special)["input_ids"]
        if special and self.auto_eos:
            out = [ids[:-1] if ids and ids[-1] == self.eos_id else ids for ids in out]
        return [list(ids) for ids in out]

    def with_eos(self, ids: list[int]) -> list[int]:
        return ids + [self.eos_id] if self.cfg.add_eos else ids

    def encode_batch(self, records: list[Record]) -> list[Encoded | RowError]:
        """Encodes a batch of records; bad rows come back as ``RowError`` in place."""
        raise NotImplementedError


def _prefix_error(source: str, tok, prompt: list[int], full: list[int]) -> RowError:
    k = next((i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), None)
    k = len(full) if k is None else k
    seen = tok.convert_ids_to_tokens(prompt[k : k + 1])
    got = tok.convert_ids_to_tokens(full[k : k + 1])
    return RowError(
        source,
        "token prefix mismatch",
        f"the prompt's tokens are not a prefix of the full text's tokens (token {k}: "
        f"{seen} alone vs {got} in context: tokens merge across the prompt/response "
        "boundary); end the prompt with a separator such as a newline, or start the response "
        "without leading whitespace",
    )


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
                out[i] = _prefix_error(records[i].source, self.tok, p_ids, f_ids)
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


_PROBE = [
    {"role": "user", "content": "Probe question?"},
    {"role": "assistant", "content": "Probe reply."},
]


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens, including added tokens marked special."""
    ids = set(tokenizer.all_special_ids)
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, t in decoder.items() if getattr(t, "special", False))
    return ids


def turn_terminator(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant's content.

    Found by rendering a probe conversation (a user turn, an assistant turn) and
    tokenizing what follows the assistant's text: ``<|im_end|>`` for ChatML (Qwen2,
    SmolLM2), ``<end_of_turn>`` for Gemma, ``<|eot_id|>`` for Llama 3, EOS for Llama 2,
    Mistral and Zephyr. Only whitespace may come before it.

    Returns:
      The token id, or None when the template writes no special token there (or cannot
      render the probe).

    Raises:
      DataError: jinja2, which renders chat templates, is not installed.
    """
    try:
        text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    except ImportError as e:
        raise DataError(
            f"rendering the tokenizer's chat template needs jinja2 ({e}); pip install 'jinja2>=3.1'"
        ) from None
    except Exception:  # a template that rejects the probe; each row reports its own error
        return None
    reply = _PROBE[1]["content"]
    at = text.rfind(reply)
    if at < 0:
        return None
    special = special_token_ids(tokenizer)
    for tid in tokenizer(text[at + len(reply) :], add_special_tokens=False)["input_ids"]:
        if tid in special:
            return int(tid)
        if tokenizer.decode([tid]).strip():
            return None
    return None


class ChatEncoder(Encoder):
    """``chat`` (and instruction with ``template: chat``): the tokenizer's chat template."""

    def __init__(self, cfg: DataConfig, tokenizer, label_names=None):
        super().__init__(cfg, tokenizer, label_names)
        template = tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default", next(iter(template.values()), None))
        if not template:
            raise DataError(
                f"data.format={cfg.format!r} renders with the tokenizer's chat template, but "
                "this tokenizer has none; use data.format=instruction with a text template"
            )
        self.has_generation_tags = bool(_GENERATION_TAG.search(template))
        # The turn terminator must be trained whatever data.add_eos says; a template that
        # writes none falls back to EOS, required only with data.add_eos.
        self.terminator = turn_terminator(tokenizer)
        stop = self.terminator if self.terminator is not None else self.eos_id
        self.stop_ids = {stop} if stop is not None else set()

    def double_bos_cause(self, name: str) -> str:
        # jaxtune adds no special tokens to the rendered template, so the text holds both.
        return (
            f"the rendered chat template already writes {name} and the conversation's text "
            f"starts with another; remove {name} from the first message or data.system_prompt"
        )

    def messages(self, rec: Record) -> list[dict[str, str]]:
        """The record's conversation as role/content dicts, with the system prompt."""
        if self.cfg.format == "instruction":
            instruction = self.field(rec, "instruction")
            inp = self.field(rec, "input")
            user = f"{instruction}\n\n{inp}" if inp else instruction
            msgs = [
                {"role": "user", "content": user},
                {"role": "assistant", "content": self.field(rec, "output")},
            ]
        else:
            raw = self.field(rec, "messages", kind=list)
            if not isinstance(raw, list) or not raw:
                raise RowError(
                    rec.source,
                    "wrong type",
                    f"field {self.cfg.fields.get('messages', 'messages')!r} must be a non-empty "
                    "list of {role, content} objects",
                )
            role_key = self.cfg.fields.get("role", "role")
            content_key = self.cfg.fields.get("content", "content")
            msgs = []
            for k, m in enumerate(raw):
                if not isinstance(m, dict) or not isinstance(m.get(role_key), str):
                    raise RowError(
                        rec.source,
                        "wrong type",
                        f"message {k} has no string {role_key!r}; expected {{role, content}}",
                    )
                if not isinstance(m.get(content_key), str):
                    raise RowError(
                        rec.source,
                        "wrong type",
                        f"message {k} has no string {content_key!r}; expected {{role, content}}",
                    )
                msgs.append({"role": m[role_key], "content": m[content_key]})
        if self.cfg.system_prompt and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        return msgs

    def render(self, rec: Record, msgs, generation_prompt: bool) -> str:
        try:
            return self.tok.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # jinja raises TemplateError or whatever the template raises
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RowError(
                rec.source, "chat template error", f"chat template failed: {msg}"
            ) from None

    def finalize(self, rec: Record, ids: list[int], spans: list[tuple[int, int]]) -> Encoded:
        """Mask from assistant spans; each must hold the stop token that ends the turn.

        ``ids`` are the rendered conversation's tokens (no special tokens added); the
        tokenizer's BOS goes in front when the template wrote none (spans shift with it).
        """
        if self.bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = self.bos + ids
            spans = [(a + len(self.bos), b + len(self.bos)) for a, b in spans]
        self.check_bos(rec, ids)
        if self.cfg.train_on_inputs:
            return Encoded(ids, [1] * len(ids))
        if not spans:
            raise RowError(
                rec.source,
                "empty loss mask",
                "empty loss mask: the conversation has no assistant turn to train on",
            )
        mask = [0] * len(ids)
        for k, (a, b) in enumerate(spans, start=1):
            if b <= a:
                raise RowError(
                    rec.source,
                    "empty loss mask",
                    f"empty loss mask: assistant turn {k} renders to no tokens in the chat "
                    "template",
                )
            if self.terminator is not None or self.cfg.add_eos:
                stops = [t for t in range(a, b) if ids[t] in self.stop_ids]
                if not stops:
                    raise self._stop_error(rec, k)
                if self.cfg.add_eos:
                    b = stops[-1] + 1
            mask[a:b] = [1] * (b - a)
        return Encoded(ids, mask)

    def _stop_error(self, rec: Record, k: int) -> RowError:
        if self.terminator is None:
            name = self.tok.convert_ids_to_tokens([self.eos_id])[0]
            return RowError(
                rec.source,
                "stop token outside mask",
                f"assistant turn {k}: the stop token {name!r} is not inside the "
                "assistant's loss mask; expected the chat template to end assistant "
                "turns with the EOS token (or set data.add_eos=false)",
            )
        name = self.tok.convert_ids_to_tokens([self.terminator])[0]
        fix = (
            "move {% endgeneration %} after it in the chat template"
            if self.has_generation_tags
            else "expected the chat template to end every assistant turn with it"
        )
        return RowError(
            rec.source,
            "turn terminator outside mask",
            f"assistant turn {k}: the turn terminator {name!r} (what the chat template writes "
            "after assistant content) is not inside the loss mask, so the model would never "
            f"learn to stop; {fix}",
        )

    def encode_batch(self, records):
        out: list[Any] = [None] * len(records)
        plans = []  # (record index, messages, texts, assistant turn indices)
        for i, rec in enumerate(records):
            try:
                msgs = self.messages(rec)
                if self.has_generation_tags:
                    out[i] = self._encode_with_tags(rec, msgs)
                    continue
                turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
                texts = []
                for k in turns:
                    texts += [
                        self.render(rec, msgs[:k], True),
                        self.render(rec, msgs[: k + 1], False),
                    ]
                texts.append(self.render(rec, msgs, False))
                plans.append((i, texts))
            except RowError as e:
                out[i] = e
        # The template already holds BOS and friends, so no special tokens are added.
        flat = self.tokenize([t for _, texts in plans for t in texts], special=False)
        pos = 0
        for i, texts in plans:
            tokenized = flat[pos : pos + len(texts)]
            pos += len(texts)
            full = tokenized[-1]
            try:
                for part in tokenized[:-1]:
                    if full[: len(part)] != part:
                        raise _prefix_error(records[i].source, self.tok, part, full)
                spans = [
                    (len(tokenized[j]), len(tokenized[j + 1]))
                    for j in range(0, len(tokenized) - 1, 2)
                ]
                out[i] = self.finalize(records[i], full, spans)
            except RowError as e:
                out[i] = e
        return out

    def _encode_with_tags(self, rec: Record, msgs) -> Encoded:
        try:
            enc = self.tok.apply_chat_template(
                msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
        except Exception as e:  # template errors, as in render()
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RowError(
                rec.source, "chat template error", f"chat template failed: {msg}"
            ) from None
        ids, amask = list(enc["input_ids"]), list(enc["assistant_masks"])
        spans, t = [], 0
        while t < len(amask):
            if amask[t]:
                start = t
                while t < len(amask) and amask[t]:
                    t += 1
                spans.append((start, t))
            t += 1
        return self.finalize(rec, ids, spans)


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
    raise DataError(
        f"data.format = {cfg.format!r}; expected instruction, chat, completion, text or "
        "classification"
    )
