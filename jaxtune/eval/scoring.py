"""Log-likelihood scoring of continuations: multiple choice and label verbalizers.

A request is one context with C candidate continuations. Tokenization follows
lm-evaluation-harness: trailing whitespace of the context moves into the continuation, the
context is encoded alone, and a continuation's tokens are the tokens of
``context + continuation`` after the context's token count. So every choice of a request
shares the context's tokens exactly, and the context is run **once** per request:

1. prefill: the context minus its last token, left-padded to a length bucket, goes
   through the model into a KV cache (hidden states only: no vocabulary projection);
2. the cache is repeated C times and the rows ``[last context token, continuation[:-1]]``
   are run against it, right-padded; their logits score every continuation token.

The result equals scoring ``context + continuation`` in one forward pass per choice (the
tests check it against a plain forward and against transformers), at roughly
``(P + C * T) / (C * (P + T))`` of the cost for a context of P and continuations of T tokens.
Requests are sorted by length and batched with fixed shapes per length bucket, so the
number of compilations stays small.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.eval.classification import classification_metrics

__all__ = [
    "ChoiceScores",
    "bucket_length",
    "classification_metrics",
    "classify_by_verbalizer",
    "encode_pair",
    "encode_request",
    "score_choices",
    "score_requests",
    "score_token_requests",
    "verbalizer_probs",
]


@dataclass(frozen=True)
class ChoiceScores:
    """Scores of the C continuations of one request.

    Attributes:
      logprob: float64 [C] summed log-probability of each continuation's tokens.
      tokens: int [C] number of continuation tokens scored.
      greedy: bool [C] every continuation token is the model's argmax (``is_greedy``).
    """

    logprob: np.ndarray
    tokens: np.ndarray
    greedy: np.ndarray


def bucket_length(n: int, minimum: int = 8) -> int:
    """Pads a length up to a bucket: powers of two up to 16, then 2 buckets per octave.

    (16, 24, 32, 48, 64, 96, ...): under 33% padding with few distinct shapes, since
    every new (batch, length) shape costs a compilation (seconds on a CPU).
    """
    n = max(int(n), minimum, 1)
    hi = 1 << (n - 1).bit_length()
    if n <= 16:
        return hi
    mid = hi * 3 // 4
    return mid if n <= mid else hi


def _prefix_token(tokenizer) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def encode_request(
    tokenizer, context: str, continuations: Sequence[str], add_special_tokens: bool = True
) -> tuple[list[int], list[list[int]]]:
    """Token ids of a context and of each continuation (lm-evaluation-harness convention).

    Args:
      context: the prompt.
      continuations: C candidate continuations (e.g. ``" Paris"``).
      add_special_tokens: encode as the tokenizer does by default (BOS for Llama-style
        tokenizers, nothing for SmolLM2); False encodes the raw text only.

    Returns:
      (context ids, C continuation id lists). An empty context becomes the BOS (else EOS)
      token so the first continuation token always has something to condition on.
    """
    # All trailing whitespace (spaces, newlines, tabs: ``str.rstrip()``) moves into the
    # continuation, exactly as lm-evaluation-harness's TemplateLM._encode_pair
    # (lm_eval/api/model.py): ``n_spaces = len(context) - len(context.rstrip())``, then
    # ``continuation = context[-n_spaces:] + continuation``, ``context = context[:-n_spaces]``.
    # "Answer: " + "Paris" is scored as "Answer:" + " Paris": BPE vocabularies attach the
    # space to the word, so this is the tokenization the model saw in training.
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuations = [context[-spaces:] + c for c in continuations]
        context = context[:-spaces]
    texts = [context] + [context + c for c in continuations]
    enc = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    ctx = list(enc[0])
    conts = [list(e[len(ctx) :]) for e in enc[1:]]
    if not ctx:
        ctx = [_prefix_token(tokenizer)]
    return ctx, conts


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """(token ids of context + continuation, number of context tokens)."""
    ctx, (cont,) = encode_request(tokenizer, context, [continuation])
    return ctx + cont, len(ctx)


@partial(jax.jit, static_argnames=("graphdef",))
def _score_batch(graphdef, state, prefix, prefix_mask, cont_in, cont_tgt, cont_mask):
    """Scores B requests x C continuations against a shared, cached context.

    Args:
      prefix: int32 [B, P] context tokens except the last, left-padded.
      prefix_mask: int32 [B, P] 1 on real tokens.
      cont_in: int32 [B, C, T] ``[last context token, continuation[:-1]]``, right-padded.
      cont_tgt: int32 [B, C, T] the continuation tokens (targets of ``cont_in``).
      cont_mask: int32 [B, C, T] 1 on real continuation tokens.

    Returns:
      (logprob float32 [B, C], greedy bool [B, C]).
    """
    model = nnx.merge(graphdef, state)
    b, p = prefix.shape
    _, c, t = cont_in.shape
    cache = model.init_cache(b, p + t)
    # Cache slots after the prefix are written by the continuation pass; the model only
    # attends to slots already filled, so marking them valid now is safe.
    mask = jnp.concatenate([prefix_mask, jnp.ones((b, t), prefix_mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prefix_mask, axis=1) - 1, 0).astype(jnp.int32)
    _, cache = model.hidden_states(prefix, mask, positions=positions, cache=cache, cache_index=0)
    cache = jax.tree.map(lambda x: jnp.repeat(x, c, axis=1), cache)  # [L, B*C, P+T, K, H]
    start = jnp.sum(prefix_mask, axis=1, dtype=jnp.int32)  # [B]: position of cont_in[0]
    pos = jnp.repeat(start[:, None] + jnp.arange(t, dtype=jnp.int32), c, axis=0)
    flat_mask = cont_mask.reshape(b * c, t)
    mask = jnp.concatenate([jnp.repeat(prefix_mask, c, axis=0), flat_mask], axis=1)
    logits, _ = model(cont_in.reshape(b * c, t), mask, positions=pos, cache=cache, cache_index=p)
    tgt = cont_tgt.reshape(b * c, t)
    # log p(target) = logit[target] - logsumexp(logits): avoids a [B*C, T, V] log_softmax.
    lse = jax.nn.logsumexp(logits, axis=-1)
    tok_lp = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0] - lse
    w = flat_mask.astype(jnp.float32)
    logprob = jnp.sum(tok_lp * w, axis=-1).reshape(b, c)
    hit = (jnp.argmax(logits, axis=-1) == tgt) | (flat_mask == 0)
    return logprob, jnp.all(hit, axis=-1).reshape(b, c)


def score_token_requests(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    *,
    batch_size: int = 32,
    max_len: int = 2048,
    pad_id: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[ChoiceScores]:
    """Scores token-id requests: each a context and its candidate continuations.

    Args:
      model: a causal LM with ``hidden_states``/``init_cache`` (``LlamaForCausalLM``).
      requests: N pairs (context ids (>= 1 token), C_i continuation id lists).
      batch_size: (request, continuation) rows per forward pass; requests per batch is
        ``batch_size // max C_i``.
      max_len: context + continuation longer than this keeps the context's last tokens
        (left truncation, as lm-evaluation-harness does).
      pad_id: id written into padding (masked, never attended).
      progress: called as ``progress(done, total)`` after each batch.

    Returns:
      N :class:`ChoiceScores`, in request order.
    """
    c_max = max((len(conts) for _, conts in requests), default=1)
    per_batch = max(1, batch_size // max(c_max, 1))
    prepared = []
    for ctx, conts in requests:
        ctx, conts = list(ctx), [list(x) for x in conts]
        if not ctx:
            raise ValueError("a context needs at least one token (see encode_request)")
        longest = max((len(x) for x in conts), default=0)
        if longest >= max_len:  # keep the end of an over-long continuation, 1 context token
            conts = [x[-(max_len - 1) :] for x in conts]
            longest = max_len - 1
        ctx = ctx[-max(1, max_len - longest) :]
        prepared.append((ctx, conts))
    # Group requests of equal (context, continuation) buckets: batches then share shapes,
    # which bounds the number of compilations by the buckets present, not the batches.
    keys = [
        (
            -bucket_length(len(ctx) - 1),
            -bucket_length(max((len(x) for x in conts), default=1), 1),
            -len(ctx),
        )
        for ctx, conts in prepared
    ]
    order = sorted(range(len(prepared)), key=keys.__getitem__)
    results: list[ChoiceScores | None] = [None] * len(prepared)
    graphdef, state = nnx.split(model)
    for start in range(0, len(order), per_batch):
        idx = order[start : start + per_batch]
        p = bucket_length(max(len(prepared[i][0]) - 1 for i in idx))
        t = bucket_length(max((len(x) for i in idx for x in prepared[i][1]), default=1), 1)
        prefix = np.full((per_batch, p), pad_id, np.int32)
        prefix_mask = np.zeros((per_batch, p), np.int32)
        cont_in = np.full((per_batch, c_max, t), pad_id, np.int32)
        cont_tgt = np.full((per_batch, c_max, t), pad_id, np.int32)
        cont_mask = np.zeros((per_batch, c_max, t), np.int32)
        for r, i in enumerate(idx):
            ctx, conts = prepared[i]
            head = ctx[:-1]
            if head:
                prefix[r, p - len(head) :] = head
                prefix_mask[r, p - len(head) :] = 1
            for j, cont in enumerate(conts):
                n = len(cont)
                if n:
                    cont_in[r, j, :n] = [ctx[-1], *cont[:-1]]
                    cont_tgt[r, j, :n] = cont
                    cont_mask[r, j, :n] = 1
        lp, greedy = _score_batch(
            graphdef,
            state,
            jnp.asarray(prefix),
            jnp.asarray(prefix_mask),
            jnp.asarray(cont_in),
            jnp.asarray(cont_tgt),
            jnp.asarray(cont_mask),
        )
        lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
        for r, i in enumerate(idx):
            c = len(prepared[i][1])
            results[i] = ChoiceScores(
                logprob=lp[r, :c].copy(),
                tokens=np.asarray([len(x) for x in prepared[i][1]], np.int64),
                greedy=greedy[r, :c].copy(),
            )
        if progress is not None:
            progress(min(start + per_batch, len(order)), len(order))
    return results  # type: ignore[return-value]


def score_choices(
    model,
    tokenizer,
    requests: Sequence[tuple[str, Sequence[str]]],
    *,
    batch_size: int = 32,
    max_len: int = 2048,
    add_special_tokens: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> list[ChoiceScores]:
    """Scores text requests: each a context and its candidate continuations.

    Args:
      requests: N pairs (context, C_i continuation strings).
      batch_size, max_len, progress: see :func:`score_token_requests`.
      add_special_tokens: see :func:`encode_request`.

    Returns:
      N :class:`ChoiceScores`, in request order.
    """
    encoded = [encode_request(tokenizer, c, conts, add_special_tokens) for c, conts in requests]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return score_token_requests(
        model, encoded, batch_size=batch_size, max_len=max_len, pad_id=pad, progress=progress
    )


def score_requests(
    model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 16, max_len: int = 1024
) -> np.ndarray:
    """Summed log-prob of each continuation given its context.

    Pairs that share a context are scored together (one context pass).

    Args:
      requests: N (context, continuation) pairs.
      batch_size: rows per forward pass.
      max_len: longer requests keep their last ``max_len`` tokens (left truncation).

    Returns:
      float64 [N, 2]: (sum log-prob, number of continuation tokens).
    """
    groups: dict[str, list[int]] = {}
    for i, (ctx, _) in enumerate(requests):
        groups.setdefault(ctx, []).append(i)
    grouped = [(ctx, [requests[i][1] for i in rows]) for ctx, rows in groups.items()]
    scores = score_choices(model, tokenizer, grouped, batch_size=batch_size, max_len=max_len)
    out = np.zeros((len(requests), 2))
    for rows, s in zip(groups.values(), scores, strict=True):
        out[rows, 0] = s.logprob
        out[rows, 1] = s.tokens
    return out


def verbalizer_probs(
    model, tokenizer, prompts: list[str], verbalizers: list[str], **kw
) -> np.ndarray:
    """Class probabilities of an LM used as a classifier through label verbalizers.

    Args:
      prompts: N prompts (e.g. ``"Review: ...\\nSentiment:"``).
      verbalizers: K label words, one per class (e.g. ``[" negative", " positive"]``).
      **kw: ``batch_size``, ``max_len`` for :func:`score_choices`.

    Returns:
      float64 [N, K]: softmax over the K verbalizers' summed log-likelihoods (the
      probability of each class given that the answer is one of them).
    """
    scores = score_choices(model, tokenizer, [(p, verbalizers) for p in prompts], **kw)
    lp = np.stack([s.logprob for s in scores]) if scores else np.zeros((0, len(verbalizers)))
    lp = lp - lp.max(axis=-1, keepdims=True)
    e = np.exp(lp)
    return e / e.sum(axis=-1, keepdims=True)


def classify_by_verbalizer(
    model, tokenizer, prompts: list[str], verbalizers: list[str], **kw
) -> np.ndarray:
    """Predicted class per prompt: the verbalizer with the highest log-likelihood.

    Args:
      prompts: N prompts (e.g. ``"Review: ...\\nSentiment:"``).
      verbalizers: K label words, one per class (e.g. ``[" negative", " positive"]``).
      **kw: ``batch_size``, ``max_len`` for :func:`score_choices`.

    Returns:
      int [N] class indices into ``verbalizers``.
    """
    return verbalizer_probs(model, tokenizer, prompts, verbalizers, **kw).argmax(-1)
