"""Generation samples before and after training, with their error categories.

``eval.generate_samples`` held-out examples are cut where their trained part begins: the
model continues the prompt exactly as it was tokenized for training (template, chat
markers, BOS), greedily, up to ``eval.max_new_tokens``, once before the first step and
once after the last. The trained tokens are the reference. Each answer gets the error
category of :func:`jaxtune.eval.analysis.error_category` (empty, repetitive, too long,
exact match, partial, wrong), and ``report.md`` shows the two answers side by side.

Examples come from the validation split, else the test split, else the training split
(then labelled so: those answers show memorisation, not generalisation). For ``text``
data, where every token is trained, the first half of a document (at most 32 tokens) is
the prompt.

Files: ``run_dir/eval/samples_before.jsonl`` and ``samples_after.jsonl``, one row per
sample: ``prompt``, ``reference``, ``output``, ``finish_reason``, ``tokens``, ``category``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxtune.atomic import atomic_file
from jaxtune.data.chat import turn_terminator
from jaxtune.eval.analysis import analyze_generations, error_category
from jaxtune.eval.generate import SamplingConfig, eos_token_ids, generate_ids

FILES = {"before": "samples_before.jsonl", "after": "samples_after.jsonl"}
TEXT_PROMPT_TOKENS = 32


def prompt_and_reference(ids: np.ndarray, mask: np.ndarray) -> tuple[list[int], list[int]] | None:
    """Splits one tokenized example where its first trained run begins.

    Args:
      ids: int [L] the example's tokens.
      mask: [L], 1 where a token is a trained target.

    Returns:
      (prompt ids, reference ids: the first contiguous trained run), or None when nothing
      is trained. An example trained from its first target on (``text``) is cut after
      half its tokens, at most :data:`TEXT_PROMPT_TOKENS`.
    """
    trained = np.flatnonzero(np.asarray(mask)[1:]) + 1  # token 0 is never a target
    if not len(trained):
        return None
    start = int(trained[0])
    if start == 1:
        start = max(1, min(len(ids) // 2, TEXT_PROMPT_TOKENS))
    end = start
    while end < len(ids) and mask[end]:
        end += 1
    return [int(t) for t in ids[:start]], [int(t) for t in ids[start:end]]


class Samples:
    """Generates answers to a few held-out prompts before and after training.

    Args:
      cfg: the run config (``eval.generate_samples``, ``eval.max_new_tokens``).
      tokenizer: the model's tokenizer.
      datasets: the tokenized splits.
      graphdef: the model's graph, merged with the live weights for each generation.
      run_dir: where ``eval/`` goes.
      language_model: False for classifier heads (nothing to generate).
    """

    def __init__(self, cfg, tokenizer, datasets: dict, graphdef, run_dir: Path, *, language_model):
        self.cfg, self.tokenizer, self.graphdef = cfg, tokenizer, graphdef
        self.dir = Path(run_dir) / "eval"
        self.items: list[tuple[list[int], list[int]]] = []
        self.split = None
        n = cfg.eval.generate_samples
        if not n or not language_model or jax.process_count() > 1:
            return
        for split in ("validation", "test", "train"):
            ds = datasets.get(split)
            if ds is None:
                continue
            step = 2 if ds.paired else 1  # preference pairs: the chosen side
            for i in range(0, ds.num_examples, step):
                cut = prompt_and_reference(*ds.example(i))
                if cut is not None:
                    self.items.append(cut)
                if len(self.items) == n:
                    break
            self.split = split
            break

    def __bool__(self) -> bool:
        return bool(self.items)

    def run(self, when: str, params, frozen) -> list[dict] | None:
        """Generates for every prompt and writes ``samples_<when>.jsonl`` (``before`` is
        kept when it exists: a resumed run does not regenerate the base answers)."""
        path = self.dir / FILES[when]
        if not self or (when == "before" and path.exists()):
            return None
        model = nnx.merge(self.graphdef, params, frozen)
        tok = self.tokenizer
        eos = eos_token_ids(model, tok)
        term = turn_terminator(tok) if getattr(tok, "chat_template", None) else None
        if term is not None and term not in eos:
            eos = sorted({*eos, term})
        new = self.cfg.eval.max_new_tokens
        prompts = [p for p, _ in self.items]
        max_pos = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        if max_pos:
            # Prompt + answer must fit the model's positions (learned position embeddings
            # would silently clamp): keep the prompts' ends, as training truncates.
            new = min(new, max(1, max_pos // 2))
            prompts = [p[-(max_pos - new) :] for p in prompts]
        sampling = SamplingConfig(max_new_tokens=new)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        outs, stats = generate_ids(model, prompts, eos, sampling, pad)
        texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
        refs = [tok.decode(r, skip_special_tokens=True) for _, r in self.items]
        analysis = analyze_generations(
            texts,
            references=refs,
            finish_reasons=stats["finish_reasons"],
            token_counts=stats["token_counts"],
        )
        rows = [
            {
                "split": self.split,
                "prompt": tok.decode(p, skip_special_tokens=False),
                "reference": ref,
                "output": text,
                "finish_reason": s["finish_reason"],
                "tokens": s["tokens"],
                "category": error_category(s),
            }
            for (p, _), ref, text, s in zip(
                self.items, refs, texts, analysis["samples"], strict=True
            )
        ]
        if jax.process_index() == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_file(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return rows
