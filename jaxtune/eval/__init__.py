"""Evaluation: held-out perplexity, classification metrics, multiple-choice scoring,
KV-cache generation and error analysis, and the ``jaxtune eval`` report.

Entry points (imported lazily, so ``import jaxtune.eval`` stays light)::

    from jaxtune.eval import run_tasks, evaluate_loss, classification_metrics

    results = run_tasks(model, tokenizer, ["arc_easy", "mmlu", "my_task.jsonl"], limit=100)
    # {"arc_easy": {"acc": .., "acc_norm": .., "acc_stderr": .., "n": 100}, "mmlu": {...}, ...}
    evaluate_loss(model, datasets["validation"], batch_size=8, mesh=mesh)   # loss, perplexity
    classification_metrics(pred_ids, gold_ids, num_classes)                # acc, macro-F1, confusion
    generate_text(model, tokenizer, prompts, SamplingConfig(max_new_tokens=64), chat=True)
    analyze_generations(texts, references=refs, finish_reasons=reasons)

Modules: ``scoring`` (log-likelihood of continuations), ``multiple_choice`` (acc /
acc_norm), ``tasks`` (ARC, HellaSwag, MMLU, BoolQ, JSONL), ``perplexity``,
``classification``, ``generate``, ``analysis``, ``report``, ``runner``, and the
counterfactual bias probe (``counterfactual``, ``probes``, ``bias_probe``); the CLI is
``jaxtune.cli.eval``. Pairwise model comparison (``jaxtune compare``): ``compare``
(``compare_models``), ``judges``, ``elo`` (``elo_ratings``), ``compare_report``.
``harness`` is the lm-evaluation-harness backend (``--model jaxtune``): it imports
``lm_eval`` (the optional ``lmeval`` extra), so it is not among the lazy names here.
"""

from __future__ import annotations

import importlib

_API = {
    "run_tasks": "jaxtune.eval.runner",
    "evaluate_loss": "jaxtune.eval.perplexity",
    "perplexity_of_data": "jaxtune.eval.perplexity",
    "classification_metrics": "jaxtune.eval.classification",
    "classification_report": "jaxtune.eval.classification",
    "classify_from_logits": "jaxtune.eval.classification",
    "classify_by_verbalizer": "jaxtune.eval.scoring",
    "verbalizer_probs": "jaxtune.eval.scoring",
    "run_probe": "jaxtune.eval.bias_probe",
    "score_choices": "jaxtune.eval.scoring",
    "score_requests": "jaxtune.eval.scoring",
    "evaluate_items": "jaxtune.eval.multiple_choice",
    "load_task": "jaxtune.eval.tasks",
    "SamplingConfig": "jaxtune.eval.generate",
    "generate_ids": "jaxtune.eval.generate",
    "generate_text": "jaxtune.eval.generate",
    "analyze_generations": "jaxtune.eval.analysis",
    "write_report": "jaxtune.eval.report",
    "compare_models": "jaxtune.eval.compare",
    "elo_ratings": "jaxtune.eval.elo",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'jaxtune.eval' has no attribute {name!r}")
