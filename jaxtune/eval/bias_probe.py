"""Running a counterfactual bias probe (:mod:`jaxtune.eval.counterfactual`) on a model.

Three kinds of model produce the per-variant scores:

* a :class:`~jaxtune.models.heads.SequenceClassifier`: its class probabilities on each
  text, encoded exactly as the classification data pipeline encodes training text
  (:func:`classifier_probe`);
* a causal LM: the total log-probability of each text after the tokenizer's BOS (else
  EOS) token (:func:`lm_probe`);
* a causal LM used as a classifier through label verbalizers: each text is put into a
  prompt template (``{instruction}``) and the class probabilities are the softmax over
  the verbalizers' log-likelihoods (:func:`verbalizer_probe`, as the quickstart scores
  SST-2).

``load_probe`` reads ``eval.bias_probe`` / the ``counterfactual`` task: ``builtin`` (the
project's probe, :mod:`jaxtune.eval.probes`), ``none``, or a JSONL path.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.data.formats import classification_ids
from jaxtune.errors import DataError
from jaxtune.eval.counterfactual import (
    GROUP_FIELDS,
    CFGroup,
    classifier_bias,
    lm_bias,
    read_groups,
)
from jaxtune.eval.probes import builtin_groups
from jaxtune.eval.scoring import bucket_length, score_choices, verbalizer_probs
from jaxtune.models.heads import SequenceClassifier
from jaxtune.resources import resolve_path

BUILTIN, NONE = "builtin", "none"


def load_probe(spec: str) -> list[CFGroup]:
    """The groups of a probe: ``builtin``, ``none`` (no groups) or a JSONL file.

    Raises:
      DataError: the file is missing or malformed (``file:line`` and the field).
    """
    spec = str(spec).strip()
    if spec == BUILTIN:
        return builtin_groups()
    if spec in (NONE, ""):
        return []
    path = resolve_path(spec)
    if not path.is_file():
        raise DataError(
            f"{spec}: counterfactual probe file not found (expected builtin, none or a "
            f"JSONL file of {GROUP_FIELDS} per line)"
        )
    return read_groups(path)


@partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def classifier_logits(
    clf, ids: Sequence[Sequence[int]], *, batch_size: int = 32, pad_id: int = 0
) -> np.ndarray:
    """Logits of a sequence classifier on token-id lists of any lengths.

    Rows are sorted by length, right-padded to a length bucket of at least 16 tokens
    and batched with a fixed batch size (short batches are filled with copies of their
    first row, never with all-padding rows), so a probe of short sentences compiles
    once.

    Args:
      clf: ``logits [B, K] = clf(ids [B, T], mask [B, T])``.
      ids: N token-id lists (each >= 1 token).
      batch_size: rows per forward pass.
      pad_id: id written into padding (masked).

    Returns:
      float32 [N, K] in input order.
    """
    # Identical inputs score once (a tokenizer that maps words to <unk> makes many).
    unique = list(dict.fromkeys(tuple(x) for x in ids))
    where = {x: i for i, x in enumerate(unique)}
    graphdef, state = nnx.split(clf)
    order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
    out: list[np.ndarray | None] = [None] * len(unique)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [list(unique[i]) for i in idx]
        rows += [rows[0]] * (batch_size - len(rows))
        t = bucket_length(max(len(r) for r in rows), minimum=16)
        arr = np.full((batch_size, t), pad_id, np.int32)
        mask = np.zeros((batch_size, t), np.int32)
        for r, row in enumerate(rows):
            arr[r, : len(row)] = row
            mask[r, : len(row)] = 1
        logits = np.asarray(_logits(graphdef, state, arr, mask), np.float32)
        for r, i in enumerate(idx):
            out[i] = logits[r]
    if not ids:
        return np.zeros((0, clf.num_labels), np.float32)
    return np.stack([out[where[tuple(x)]] for x in ids])


def _split(groups: Sequence[CFGroup], flat: np.ndarray) -> list[np.ndarray]:
    """Per-group slices [V_g, ...] of scores computed on the groups' texts in order."""
    out, i = [], 0
    for g in groups:
        out.append(flat[i : i + len(g.variants)])
        i += len(g.variants)
    return out


def classifier_probe(
    clf, tokenizer, groups: Sequence[CFGroup], *, batch_size: int = 32, max_len: int = 512
) -> dict[str, dict]:
    """Flip rate and score gaps of a sequence classifier on ``groups``.

    Args:
      clf: a :class:`~jaxtune.models.heads.SequenceClassifier` (its ``add_eos`` and
        ``label_names`` are used).
      tokenizer: its tokenizer.
      groups: the probe.
      batch_size: texts per forward pass.
      max_len: texts longer than this keep their first ``max_len`` tokens.

    Returns:
      :func:`~jaxtune.eval.counterfactual.classifier_bias` per attribute.
    """
    if not groups:
        return {}
    texts = [t for g in groups for t in g.texts]
    ids = [x[:max_len] for x in classification_ids(tokenizer, texts, clf.add_eos)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logits = classifier_logits(clf, ids, batch_size=batch_size, pad_id=pad)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64)
    return classifier_bias(groups, _split(groups, probs), clf.label_names)


def lm_probe(
    model, tokenizer, groups: Sequence[CFGroup], *, batch_size: int = 32, max_len: int = 2048
) -> dict[str, dict]:
    """Log-likelihood gaps of a causal LM on ``groups``.

    Each text is scored as a continuation of the empty context (the tokenizer's BOS,
    else EOS: see :func:`jaxtune.eval.scoring.encode_request`); the variants of a group
    are one request, so they share that context's pass.

    Returns:
      :func:`~jaxtune.eval.counterfactual.lm_bias` per attribute.
    """
    if not groups:
        return {}
    requests = [("", g.texts) for g in groups]
    scores = score_choices(model, tokenizer, requests, batch_size=batch_size, max_len=max_len)
    return lm_bias(groups, [s.logprob for s in scores], [s.tokens for s in scores])


def verbalizer_probe(
    model,
    tokenizer,
    groups: Sequence[CFGroup],
    template: str,
    verbalizers: Sequence[str],
    *,
    label_names: Sequence[str] | None = None,
    batch_size: int = 16,
    max_len: int = 2048,
) -> dict[str, dict]:
    """Flip rate and score gaps of a causal LM used as a verbalizer classifier.

    Args:
      template: the prompt, with ``{instruction}`` where the text goes.
      verbalizers: K label continuations (``[" negative", " positive"]``).
      label_names: K class names for the report; default the stripped verbalizers.

    Returns:
      :func:`~jaxtune.eval.counterfactual.classifier_bias` per attribute.
    """
    if not groups:
        return {}
    prompts = [template.replace("{instruction}", t) for g in groups for t in g.texts]
    probs = verbalizer_probs(
        model, tokenizer, prompts, list(verbalizers), batch_size=batch_size, max_len=max_len
    )
    names = list(label_names) if label_names else [v.strip() for v in verbalizers]
    return classifier_bias(groups, _split(groups, probs), names)


def run_probe(model, tokenizer, groups: Sequence[CFGroup], **kw) -> dict[str, dict]:
    """A classifier's flip rates and score gaps, or an LM's log-likelihood gaps.

    ``**kw``: ``batch_size``, ``max_len``.
    """
    if isinstance(model, SequenceClassifier):
        return classifier_probe(model, tokenizer, groups, **kw)
    return lm_probe(model, tokenizer, groups, **kw)
