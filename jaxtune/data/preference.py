"""Preference pairs (``data.format: preference``): one prompt, a chosen and a rejected
completion, tokenized as TRL's ``DPOTrainer`` does (TRL 1.16, ``_prepare_dataset``).

Accepted rows (TRL's dataset forms; ``data.fields`` remaps ``prompt`` / ``chosen`` /
``rejected`` and, inside messages, ``role`` / ``content``):

* standard: ``{"prompt": str, "chosen": str, "rejected": str}``. The prompt is tokenized
  with the tokenizer's special tokens (BOS), and so is prompt + completion; the
  completion's ids are what follows the prompt's ids, then EOS (``data.add_eos``, as
  TRL appends the EOS text).
* conversational: ``chosen`` / ``rejected`` are message lists, with ``prompt`` a message
  list too, or absent: the prompt is then the messages the two sides share (TRL's
  ``extract_prompt``). The prompt is rendered with the chat template and the generation
  prompt, each side as prompt + completion; the completion is everything the template
  writes after the prompt (its turn terminator included, no EOS added: TRL's rule).
  ``data.system_prompt`` goes in front of a prompt without a system message.

Both sides share the prompt's ids exactly: the prompt's tokens must be a prefix of each
side's tokens (a row where tokens merge across the boundary is a one-line error, as for
the other formats; TRL would silently move the boundary). Only completion tokens are
trained (the mask), and every pair is stored as two consecutive examples (chosen, then
rejected) of one dataset row.

Truncation to ``train.seq_len`` (:func:`truncate_pair`) keeps the *end* of the prompt
first (the tokenizer's BOS stays), down to half of ``seq_len`` at most, then cuts both
completions to the room left (their start is kept). The two sides of a pair always keep
the same prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxtune.data.chat import ChatEncoder
from jaxtune.data.encoding import Encoder, prefix_error
from jaxtune.data.loaders import Record, RowError


@dataclass
class Pair:
    """One tokenized preference pair, before truncation.

    Attributes:
      prompt: token ids of the prompt (BOS included), shared by both sides.
      chosen: token ids of the chosen completion (EOS / turn terminator included).
      rejected: token ids of the rejected completion.
    """

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], seq_len: int, keep_head: int = 0
) -> tuple[list[int], list[int], list[int]]:
    """The pair cut to fit ``seq_len`` tokens per side: prompt end first, then completions.

    If prompt + the longer completion exceeds ``seq_len``, the prompt keeps its first
    ``keep_head`` tokens (the tokenizer's BOS) and its last tokens, as many as leave room
    for the longer completion but never fewer than ``seq_len // 2`` in all (TRL's old
    ``max_prompt_length`` default: half of ``max_length``). Completions then keep their
    first ``seq_len - len(prompt)`` tokens (at least 1). Returns new lists.
    """
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= seq_len:
        return list(prompt), list(chosen), list(rejected)
    keep = min(len(prompt), max(seq_len - longest, seq_len // 2))
    head = min(keep_head, keep)
    prompt = prompt[:head] + prompt[len(prompt) - (keep - head) :] if keep > head else prompt[:head]
    room = seq_len - len(prompt)
    return list(prompt), list(chosen[:room]), list(rejected[:room])


def pair_examples(pair: Pair, seq_len: int, keep_head: int = 0) -> tuple[list[tuple], bool]:
    """The two stored examples of a pair (chosen first) and whether it was truncated.

    Returns:
      ``([(ids, mask, untruncated_ids), (ids, mask, untruncated_ids)], truncated)``;
      ``mask`` is 1 on completion tokens (the trained targets).
    """
    p, c, r = truncate_pair(pair.prompt, pair.chosen, pair.rejected, seq_len, keep_head)
    out = []
    for comp, full in ((c, pair.chosen), (r, pair.rejected)):
        out.append((p + comp, [0] * len(p) + [1] * len(comp), pair.prompt + full))
    truncated = len(p) + max(len(c), len(r)) < len(pair.prompt) + max(
        len(pair.chosen), len(pair.rejected)
    )
    return out, truncated


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class PreferenceEncoder(Encoder):
    """``preference``: standard (strings) or conversational (message lists) pairs."""

    def __init__(self, cfg, tokenizer, label_names=None):
        super().__init__(cfg, tokenizer, label_names)
        self._chat: ChatEncoder | None = None  # made on the first conversational row

    def chat(self) -> ChatEncoder:
        """The chat renderer (raises DataError if the tokenizer has no chat template)."""
        if self._chat is None:
            self._chat = ChatEncoder(self.cfg, self.tok)
        return self._chat

    def double_bos_cause(self, name: str) -> str:
        where = self.cfg.fields.get("prompt", "prompt")
        return (
            f"the prompt already starts with {name} and the tokenizer adds another; remove "
            f"{name} from field {where!r} (the tokenizer writes BOS itself)"
        )

    def _messages(self, rec: Record, name: str, value: Any) -> list[dict[str, str]]:
        column = self.cfg.fields.get(name, name)
        role_key = self.cfg.fields.get("role", "role")
        content_key = self.cfg.fields.get("content", "content")
        out = []
        for k, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get(role_key), str):
                raise RowError(
                    rec.source,
                    "wrong type",
                    f"field {column!r}: message {k} has no string {role_key!r}; expected "
                    "{role, content} objects",
                )
            if not isinstance(m.get(content_key), str):
                raise RowError(
                    rec.source,
                    "wrong type",
                    f"field {column!r}: message {k} has no string {content_key!r}; expected "
                    "{role, content} objects",
                )
            out.append({"role": m[role_key], "content": m[content_key]})
        return out

    def _sides(self, rec: Record) -> tuple[Any, Any, Any]:
        """(prompt, chosen, rejected): three strings, or three message lists."""
        chosen = self.field(rec, "chosen", kind=object)
        rejected = self.field(rec, "rejected", kind=object)
        prompt = self.field(rec, "prompt", kind=object)
        kinds = {type(v) for v in (prompt, chosen, rejected) if v is not None}
        if kinds == {str}:
            if prompt is None:  # TRL's implicit prompt: the text both sides start with
                n = _common_prefix(list(chosen), list(rejected))
                if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
                    n -= 1  # the space goes with the completions, as in TRL
                prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            return prompt, chosen, rejected
        if kinds == {list}:
            c = self._messages(rec, "chosen", chosen)
            r = self._messages(rec, "rejected", rejected)
            if prompt is None:  # the shared leading messages are the prompt
                n = _common_prefix(c, r)
                p, c, r = c[:n], c[n:], r[n:]
            else:
                p = self._messages(rec, "prompt", prompt)
            if not c or not r:
                raise RowError(
                    rec.source,
                    "empty completion",
                    "chosen and rejected must each add at least one message after the prompt",
                )
            if self.cfg.system_prompt and (not p or p[0]["role"] != "system"):
                p = [{"role": "system", "content": self.cfg.system_prompt}, *p]
            return p, c, r
        names = {k: self.cfg.fields.get(k, k) for k in ("prompt", "chosen", "rejected")}
        got = ", ".join(
            f"{names[k]!r} is {type(v).__name__}"
            for k, v in zip(names, (prompt, chosen, rejected), strict=True)
            if v is not None
        )
        raise RowError(
            rec.source,
            "wrong type",
            f"{got}; expected strings (standard form) or lists of messages (conversational "
            "form) in all of them",
        )

    def _texts(self, rec: Record, sides) -> tuple[list[str], bool]:
        """The three texts to tokenize (prompt, prompt + chosen, prompt + rejected) and
        whether they are rendered chats (tokenized without special tokens)."""
        prompt, chosen, rejected = sides
        if isinstance(chosen, str):
            return [prompt, prompt + chosen, prompt + rejected], False
        chat = self.chat()
        return [
            chat.render(rec, prompt, True),
            chat.render(rec, prompt + chosen, False),
            chat.render(rec, prompt + rejected, False),
        ], True

    def encode_batch(self, records):
        out: list[Any] = [None] * len(records)
        plans: dict[bool, list] = {False: [], True: []}  # rendered chat? -> (i, texts)
        for i, rec in enumerate(records):
            try:
                texts, rendered = self._texts(rec, self._sides(rec))
                plans[rendered].append((i, texts))
            except RowError as e:
                out[i] = e
        for rendered, items in plans.items():
            # Rendered chats already hold their special tokens; text gets the tokenizer's.
            flat = self.tokenize([t for _, texts in items for t in texts], special=not rendered)
            for k, (i, _) in enumerate(items):
                try:
                    out[i] = self._pair(records[i], *flat[3 * k : 3 * k + 3], rendered)
                except RowError as e:
                    out[i] = e
        return out

    def _pair(self, rec: Record, p: list[int], pc: list[int], pr: list[int], rendered) -> Pair:
        if rendered and self.bos and self.bos_id is not None and (not p or p[0] != self.bos_id):
            # A template that writes no BOS gets the tokenizer's, as chat rows do.
            p, pc, pr = self.bos + p, self.bos + pc, self.bos + pr
        for full in (pc, pr):
            if full[: len(p)] != p:
                raise prefix_error(rec.source, self.tok, p, full)
        self.check_bos(rec, pc)
        chosen, rejected = pc[len(p) :], pr[len(p) :]
        if not rendered:
            chosen, rejected = self._eos(chosen), self._eos(rejected)
        if not chosen or not rejected:
            side = "chosen" if not chosen else "rejected"
            raise RowError(
                rec.source,
                "empty completion",
                f"the {side} completion has no tokens; expected text to compare",
            )
        return Pair(p, chosen, rejected)

    def _eos(self, ids: list[int]) -> list[int]:
        # TRL appends the EOS text unless the completion already ends with it.
        if self.cfg.add_eos and (not ids or ids[-1] != self.eos_id):
            return ids + [self.eos_id]
        return ids
