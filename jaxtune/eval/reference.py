"""transformers (torch) reference implementations for parity tests and benchmarks.

Never imported by jaxtune at run time (torch is a test dependency): only
``tests/test_eval_*.py`` and ``benchmarks/`` call these. Each scores the same token ids
as :mod:`jaxtune.eval.scoring` the plain way - one forward pass over
``context + continuation`` per choice - so it checks the shared-context KV-cache scorer
against an independent implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxtune.resources import resolve_path


def load_torch_model(path: str | Path):
    """``AutoModelForCausalLM`` in float32, eval mode: an HF dir or a ``.gguf`` file."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_path(path)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


def torch_score_token_requests(
    model,
    requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    *,
    batch_size: int = 16,
    pad_id: int = 0,
) -> list[np.ndarray]:
    """Summed log-prob per continuation, one full forward per (context, continuation) row.

    Args:
      model: a transformers causal LM.
      requests: N (context ids, C_i continuation id lists).
      batch_size: rows per forward (right-padded, sorted by length).

    Returns:
      N float64 arrays [C_i].
    """
    import torch

    rows = [
        (i, j, list(ctx) + list(cont), len(ctx))
        for i, (ctx, conts) in enumerate(requests)
        for j, cont in enumerate(conts)
    ]
    rows.sort(key=lambda r: -len(r[2]))
    out = [np.zeros(len(conts)) for _, conts in requests]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        t = max(len(r[2]) for r in chunk)
        ids = torch.full((len(chunk), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), t), dtype=torch.long)
        for r, (_, _, seq, _) in enumerate(chunk):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        with torch.inference_mode():
            logp = torch.log_softmax(model(ids, attention_mask=mask).logits.float(), dim=-1)
        for r, (i, j, seq, n) in enumerate(chunk):
            tgt = torch.tensor(seq[n:])
            out[i][j] = float(logp[r, n - 1 : len(seq) - 1].gather(1, tgt[:, None]).double().sum())
    return out


def torch_greedy(model, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int]):
    """transformers' greedy ``generate`` for one prompt; new ids cut at the first EOS."""
    import torch

    ids = torch.tensor([list(prompt_ids)])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(eos_ids),
            pad_token_id=eos_ids[0],
        )
    new = out[0, ids.shape[1] :].tolist()
    for k, t in enumerate(new):
        if t in eos_ids:
            return new[:k]
    return new


def torch_loss_sums(model, batch: dict) -> tuple[float, float]:
    """(sum of weighted token cross-entropy, sum of weights) for one unpacked batch.

    batch: the data contract's numpy ``input_ids``, ``attention_mask``, ``targets`` and
    ``loss_weights`` [B, T] (the same arrays jaxtune's ``token_loss_sums`` reads).
    """
    import torch

    keep = np.asarray(batch["attention_mask"]).sum(axis=1) > 0  # drop empty filler rows
    with torch.inference_mode():
        ids = torch.tensor(np.asarray(batch["input_ids"])[keep], dtype=torch.long)
        mask = torch.tensor(np.asarray(batch["attention_mask"])[keep], dtype=torch.long)
        logp = torch.log_softmax(model(ids, attention_mask=mask).logits.double(), dim=-1)
        tgt = torch.tensor(np.asarray(batch["targets"])[keep], dtype=torch.long)
        nll = -logp.gather(2, tgt[..., None])[..., 0]
        w = torch.tensor(np.asarray(batch["loss_weights"])[keep], dtype=torch.float64)
        return float((nll * w).sum()), float(w.sum())
