"""What every data encoder shares: the encoded example, label maps, the tokenizer's own
special tokens (BOS before text, EOS it may append) and the :class:`Encoder` base class.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from jaxtune.data.config import DataConfig
from jaxtune.data.loaders import Record, RowError, _one_line, get_field
from jaxtune.data.splits import SplitSource
from jaxtune.errors import DataError


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
        "preference": (("chosen", "rejected"), ("prompt",)),
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


def prefix_error(source: str, tok, prompt: list[int], full: list[int]) -> RowError:
    """The row error for a prompt whose tokens are not a prefix of prompt + response."""
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


def resolve_label_names(cfg: DataConfig, sources: dict[str, SplitSource]) -> list[str] | None:
    """Classification label names: ``data.labels``, a ClassLabel feature, or sorted values."""
    if cfg.format != "classification":
        return None
    if cfg.labels:
        return [str(x) for x in cfg.labels]
    source = sources.get("train") or next(iter(sources.values()))
    column = cfg.fields.get("label", "label")
    names = source.class_label_names(column)
    if names:
        return names
    values = set()
    for rec in source:
        if rec.row is not None:
            try:
                value = get_field(rec.row, column)
            except KeyError:
                continue
            if value is not None:
                values.add(str(value))
    if not values:
        raise DataError(
            f"data.{source.split}: no values in label field {column!r}; expected class labels"
        )
    return derive_label_names(list(values))
