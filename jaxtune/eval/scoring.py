"""Log-likelihood scoring of continuations: label verbalizers and multiple choice.

Each (context, continuation) pair is scored in one forward pass over
``context + continuation``; the score is the summed log-probability of the continuation
tokens. Requests are sorted by length and batched into padded buckets (bounded
recompiles). The continuation's tokens are the tokens of the full text after the
context's token prefix, so merges across the boundary are handled the way training
renders the same text.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@partial(jax.jit, static_argnames=("graphdef",))
def _token_logprobs(graphdef, state, ids, mask):
    model = nnx.merge(graphdef, state)
    logits = model(ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """(token ids of context + continuation, number of context tokens)."""
    ctx = tokenizer(context)["input_ids"]
    full = tokenizer(context + continuation)["input_ids"]
    n = len(ctx)
    if full[:n] != ctx:
        # Tokens merged across the boundary: score the part after the longest common prefix.
        n = next(
            (i for i, (a, b) in enumerate(zip(ctx, full, strict=False)) if a != b),
            min(len(ctx), len(full)),
        )
    return full, max(n, 1)


def score_requests(
    model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 16, max_len: int = 1024
) -> np.ndarray:
    """Summed log-prob of each continuation given its context.

    Args:
      requests: N (context, continuation) pairs.
      batch_size: rows per forward pass.
      max_len: longer requests keep their last ``max_len`` tokens (left truncation).

    Returns:
      float64 [N, 2]: (sum log-prob, number of continuation tokens).
    """
    encoded = []
    for ctx, cont in requests:
        ids, n_ctx = encode_pair(tokenizer, ctx, cont)
        cut = max(0, len(ids) - max_len)
        encoded.append((ids[cut:], max(n_ctx - cut, 1)))
    order = np.argsort([-len(e[0]) for e in encoded], kind="stable")
    out = np.zeros((len(requests), 2))
    graphdef, state = nnx.split(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        t = max(len(encoded[i][0]) for i in idx)
        t = -(-t // 16) * 16
        b = batch_size  # fixed batch shape: one compile per length bucket
        ids = np.full((b, t), pad, np.int32)
        mask = np.zeros((b, t), np.int32)
        for r, i in enumerate(idx):
            row = encoded[i][0]
            ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        lp = np.asarray(_token_logprobs(graphdef, state, jnp.asarray(ids), jnp.asarray(mask)))
        for r, i in enumerate(idx):
            row, n_ctx = encoded[i]
            # logprob of token j sits at lp[:, j - 1]
            out[i, 0] = float(lp[r, n_ctx - 1 : len(row) - 1].sum())
            out[i, 1] = len(row) - n_ctx
    return out


def classify_by_verbalizer(
    model, tokenizer, prompts: list[str], verbalizers: list[str], **kw
) -> np.ndarray:
    """Predicted class per prompt: the verbalizer with the highest log-likelihood.

    Returns:
      int [N] class indices into ``verbalizers``.
    """
    reqs = [(p, v) for p in prompts for v in verbalizers]
    scores = score_requests(model, tokenizer, reqs, **kw)[:, 0].reshape(
        len(prompts), len(verbalizers)
    )
    return scores.argmax(axis=1)


def classification_metrics(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows = gold, columns = predicted)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (gold, pred), 1)
    f1s = []
    for c in range(num_classes):
        tp = cm[c, c]
        p = tp / max(cm[:, c].sum(), 1)
        r = tp / max(cm[c, :].sum(), 1)
        f1s.append(0.0 if p + r == 0 else 2 * p * r / (p + r))
    return {
        "accuracy": float((pred == gold).mean()) if len(gold) else 0.0,
        "macro_f1": float(np.mean(f1s)),
        "confusion": cm.tolist(),
        "n": int(len(gold)),
    }
