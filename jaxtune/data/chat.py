"""Chat data: conversations rendered with the tokenizer's chat template, loss masks on
the assistant turns, and the chat pre-flight checks.

How an assistant turn's loss mask is found: when the chat template has
``{% generation %}`` markers, transformers' assistant mask is used. Otherwise the
conversation is rendered up to each assistant turn (with the generation prompt) and
through it, and the tokens between the two prefixes are that turn's mask. Either way
each assistant span must contain the turn's stop token; tokens the template adds after
it (a newline) are not trained, since the model never generates them.

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
from typing import Any

from jaxtune.data.config import DataConfig
from jaxtune.data.encoding import Encoded, Encoder, prefix_error
from jaxtune.data.loaders import Record, RowError
from jaxtune.errors import DataError

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


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
                        raise prefix_error(records[i].source, self.tok, part, full)
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
