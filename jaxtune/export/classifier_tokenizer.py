"""The tokenizer a classifier export writes: jaxtune's input convention, for transformers.

jaxtune feeds a classifier the text's tokens plus what ``data.add_eos`` appends (EOS) and
pools the last real token; HF's decoder ``*ForSequenceClassification`` heads pool the last
token that is not ``config.pad_token_id``. :func:`export_tokenizer` makes a copy of the
tokenizer that adds exactly jaxtune's special tokens and pads with a token jaxtune's texts
never hold, and :func:`check_exported_tokenizer` proves it with the written files (no
torch): same ids, same pooled position, for a batch of probe texts of different lengths.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from jaxtune.data.formats import classification_ids as jaxtune_ids
from jaxtune.errors import ExportError
from jaxtune.models.heads import SequenceClassifier, is_encoder

# Texts the export checks the exported tokenizer on: lengths differ (so a batch pads),
# with leading / trailing spaces, non-ASCII and digits.
PROBE_TEXTS = (
    "a",
    "The film was surprisingly good, and the ending made me smile.",
    "  spaces before and after  ",
    "Ünïcödé — naïve café, 12345 and 3.14!?",
    "two words",
    "x" * 40,
)
_SPARE = re.compile(r"(?i)^[<\[]\|?(pad|unused|reserved|extra_id)")


@dataclasses.dataclass
class ExportedTokenizer:
    """The tokenizer an export writes (see :func:`export_tokenizer`).

    Attributes:
      tokenizer: the HF tokenizer to save (a copy; the caller's is unchanged).
      pad_id: its pad token's id (``config.json``'s ``pad_token_id``).
      vocab_size: the model's vocabulary after export (one more than the backbone's
        when the pad token had to be added).
      template: (ids before the text, ids after it), as jaxtune adds them.
      flags: ``add_bos_token`` / ``add_eos_token`` for ``tokenizer_config.json`` when the
        post-processor was replaced: the values that make transformers rebuild the same
        one, or ``{}`` (keys removed: transformers keeps the saved one); None = as saved.
    """

    tokenizer: object
    pad_id: int
    vocab_size: int
    template: tuple[list[int], list[int]]
    flags: dict | None

    def save(self, path: Path) -> None:
        """``save_pretrained`` + the settings transformers must read back unchanged."""
        self.tokenizer.save_pretrained(str(path))
        f = Path(path) / "tokenizer_config.json"
        tc = json.loads(f.read_text())
        if self.flags is not None:
            for key in ("add_bos_token", "add_eos_token"):
                tc.pop(key, None)
            tc.update(self.flags)
        # The class jaxtune tokenizes with (tokenizer.json as written, no per-model
        # rebuilding of the pipeline), so AutoTokenizer gives the ids checked here.
        if (Path(path) / "tokenizer.json").is_file():
            tc["tokenizer_class"] = PreTrainedTokenizerFast.__name__
        tc["padding_side"] = "right"
        f.write_text(json.dumps(tc, indent=2, ensure_ascii=False))


def export_tokenizer(tokenizer, clf: SequenceClassifier, vocab_size: int) -> ExportedTokenizer:
    """A copy of ``tokenizer`` that carries jaxtune's classification convention.

    * Special tokens: if the tokenizer alone does not produce the ids jaxtune feeds
      (:func:`jaxtune_ids`; typically the EOS that ``data.add_eos`` appends), its
      post-processor becomes a ``TemplateProcessing`` that adds exactly them.
    * Padding: right-side, with a pad token that is not EOS, BOS or any token jaxtune
      adds and not one a chat template writes: the tokenizer's own pad if it is such a
      token, else an unused special token of the vocabulary (``<pad>``, ``<unused0>``,
      ``[unused0]``, ... first; ``<repo_name>`` for SmolLM2), else a new ``<|pad|>`` in a
      spare id of the embedding (Qwen-style padded vocabularies), else a new one in a
      new embedding row (GPT-2, whose only special token is EOS).

    HF's decoder heads pool the last token that is not ``pad_token_id``; with EOS as the
    pad (the usual default) they skip the EOS jaxtune pools.
    """
    add_eos = getattr(clf, "add_eos", True)
    tok = copy.deepcopy(tokenizer)
    ids = jaxtune_ids(tok, ["a"], add_eos)[0]
    bare = list(tok("a", add_special_tokens=False)["input_ids"])
    starts = [i for i in range(len(ids) - len(bare) + 1) if ids[i : i + len(bare)] == bare]
    if not bare or not starts:
        raise ExportError(
            f"classifier export: cannot place the text's tokens {bare} in the ids jaxtune "
            f"feeds ({ids}); nothing was written"
        )
    pre, post = ids[: starts[0]], ids[starts[0] + len(bare) :]
    texts = list(PROBE_TEXTS)
    flags = None
    if [list(x) for x in tok(texts)["input_ids"]] != jaxtune_ids(tok, texts, add_eos):
        names = tok.convert_ids_to_tokens(pre + post)
        specials = sorted({(n, i) for n, i in zip(names, pre + post, strict=True)})
        a, b = names[: len(pre)], names[len(pre) :]
        try:
            tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
                single=[*a, "$A:0", *b],
                pair=[*a, "$A:0", "$B:1", *[f"{n}:1" for n in b]],
                special_tokens=specials,
            )
        except (AttributeError, ValueError, TypeError) as e:  # no backend / odd names
            raise ExportError(
                f"classifier export: cannot make the tokenizer add {names} around the "
                f"text as jaxtune does ({e}); nothing was written"
            ) from None
        bos, eos = tok.bos_token_id, tok.eos_token_id
        flags = {}
        if pre in ([], [bos]) and post == [eos]:  # what HF's own flags would build
            flags = {"add_bos_token": bool(pre), "add_eos_token": True}
    pad_id = _pad_token(tok, vocab_size, set(pre + post))
    if pad_id is None:
        raise ExportError(
            f"classifier export: the tokenizer has no token to pad with that differs from "
            f"EOS and the text's special tokens, and no spare id below the model's "
            f"{vocab_size}-token vocabulary; nothing was written"
        )
    tok.padding_side = "right"
    return ExportedTokenizer(tok, pad_id, max(vocab_size, pad_id + 1), (pre, post), flags)


def _pad_token(tok, vocab_size: int, used: set[int]) -> int | None:
    """Sets ``tok``'s pad token to one jaxtune's texts never contain; returns its id."""
    roles = ("bos", "eos", "unk", "sep", "cls", "mask")
    taken = set(used) | {getattr(tok, f"{r}_token_id", None) for r in roles}
    template = str(getattr(tok, "chat_template", None) or "")

    def free(i, name) -> bool:
        return i is not None and 0 <= i < vocab_size and i not in taken and name not in template

    if tok.pad_token is not None and free(tok.pad_token_id, tok.pad_token):
        return int(tok.pad_token_id)
    found = [(i, str(t)) for i, t in tok.added_tokens_decoder.items() if t.special]
    found += [(i, t) for t, i in tok.get_vocab().items() if _SPARE.match(t)]
    found = sorted({(0 if _SPARE.match(t) else 1, i, t) for i, t in found if free(i, t)})
    if found:
        tok.pad_token = found[0][2]
        return int(found[0][1])
    pad_id = len(tok)
    if pad_id > vocab_size:  # the tokenizer has ids the model cannot embed: no room
        return None
    for name in ("<|pad|>", "<pad>", "[PAD]", "<|jaxtune_pad|>"):
        if name not in tok.get_vocab():
            tok.add_special_tokens({"pad_token": name})
            return int(tok.pad_token_id)
    return None


def grow_embedding(tensors: dict, old: int, new: int) -> None:
    """Appends zero rows to the input embedding [old, D] -> [new, D] (in place)."""
    rows = [n for n, a in tensors.items() if a.ndim == 2 and a.shape[0] == old]
    rows = [n for n in rows if any(k in n for k in ("embed_tokens", "wte", "word_embeddings"))]
    if len(rows) != 1:
        raise ExportError(
            f"classifier export: the pad token needs a new embedding row and no single "
            f"input embedding was found ({rows}); nothing was written"
        )
    a = np.asarray(tensors[rows[0]])
    tensors[rows[0]] = np.concatenate([a, np.zeros((new - old, a.shape[1]), a.dtype)])


def check_exported_tokenizer(path, tokenizer, clf: SequenceClassifier, pad_id: int):
    """Checks an exported tokenizer as transformers uses it; returns both probe batches.

    Loads ``path``'s tokenizer files with the fast-tokenizer class (no torch), batches
    :data:`PROBE_TEXTS` with ``padding=True`` and requires, per text: the unpadded ids
    equal :func:`jaxtune_ids` of ``tokenizer``; the pad id is ``pad_id`` and occurs in no
    text; and the token HF's head pools is jaxtune's (decoders: the last token that is not
    ``pad_id``, as ``*ForSequenceClassification`` finds it; encoders: the first).

    Returns:
      ((ids, mask) as jaxtune batches the texts, (ids, mask) as transformers does), int32.
    """
    from transformers import PreTrainedTokenizerFast

    def fail(what: str):
        raise ExportError(f"classifier export: {what}; nothing was written")

    try:
        hf = PreTrainedTokenizerFast.from_pretrained(str(path))
    except (OSError, ValueError) as e:  # e.g. a slow-only tokenizer: no tokenizer.json
        fail(f"transformers' fast tokenizer cannot read the exported tokenizer ({e})")
    texts = list(PROBE_TEXTS)
    want = jaxtune_ids(tokenizer, texts, getattr(clf, "add_eos", True))
    if hf.pad_token_id != pad_id:
        fail(f"the exported tokenizer pads with id {hf.pad_token_id}, config.json says {pad_id}")
    batch = hf(texts, padding=True)
    ids, mask = (np.asarray(batch[k], np.int32) for k in ("input_ids", "attention_mask"))
    decoder = not is_encoder(clf.config)
    for r, (text, w) in enumerate(zip(texts, want, strict=True)):
        got = ids[r][mask[r] == 1].tolist()
        if got != w:
            fail(
                f"the exported tokenizer gives ids {got} for {text!r}, jaxtune feeds {w} "
                f"(transformers would classify other tokens)"
            )
        if pad_id in w:
            fail(f"the pad id {pad_id} occurs in the ids of {text!r}")
        real = np.flatnonzero(mask[r])
        if decoder:
            pooled = int(np.argmax(np.arange(ids.shape[1]) * (ids[r] != pad_id)))
            if pooled != real[-1]:
                fail(
                    f"transformers would pool position {pooled} of {text!r}, jaxtune pools "
                    f"its last token (position {real[-1]})"
                )
        elif real[0] != 0:
            fail(f"the exported tokenizer left-pads {text!r}; encoder heads read position 0")
    lengths = np.asarray([len(w) for w in want])
    ours = np.zeros_like(ids)  # jaxtune's own batch: right-padded, the mask marks tokens
    for r, w in enumerate(want):
        ours[r, : len(w)] = w
    ours_mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int32)
    return (ours, ours_mask), (ids, mask)
