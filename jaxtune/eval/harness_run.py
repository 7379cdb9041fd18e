"""``jaxtune eval --lm-eval``: lm-eval tasks on a jaxtune model, results beside jaxtune's.

:func:`run_lm_eval` builds the ``jaxtune`` backend (:class:`~jaxtune.eval.harness.JaxtuneLM`),
runs ``lm_eval.simple_evaluate`` and writes lm-eval's results and per-item sample logs
into the output directory; it returns the metrics in the shape of jaxtune's report. Like
``harness``, it imports ``lm_eval`` (the optional ``lmeval`` extra).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from lm_eval.evaluator import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable

from jaxtune.atomic import atomic_file
from jaxtune.errors import ConfigError
from jaxtune.eval.harness import JaxtuneLM

__all__ = ["run_lm_eval"]


def _numeric(metrics: dict) -> dict:
    """lm-eval's ``{"acc,none": .., "alias": ..}`` -> ``{"acc": ..}``, numbers only."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        name, _, filt = key.partition(",")
        name = "n" if name == "sample_len" else name  # jaxtune's report calls it n
        out[name if filt in ("", "none") else f"{name}/{filt}"] = value
    return out


def run_lm_eval(
    model_args: dict,
    tasks: Sequence[str],
    out_dir: str | Path,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    apply_chat_template: bool = False,
    seed: int = 1234,
) -> dict:
    """Runs lm-eval tasks on a jaxtune model; writes lm-eval's results beside jaxtune's.

    Args:
      model_args: :class:`JaxtuneLM` keyword arguments (``pretrained`` at least).
      tasks: lm-eval task (or group) names, resolved with ``include_path`` added.
      out_dir: gets ``lm_eval_results.json`` (lm-eval's results dict, without samples)
        and ``lm_eval_samples/<task>.jsonl`` (lm-eval's per-item log).
      limit: first N items per task (a float < 1: that fraction), as lm-eval's --limit.
      num_fewshot: None keeps each task's own default.
      include_path: a directory of extra task YAMLs (lm-eval's --include_path).
      apply_chat_template: render prompts with the tokenizer's chat template.
      seed: lm-eval's random / numpy / few-shot seeds.

    Returns:
      ``{task: {metric: value}}`` (numbers only; ``metric/filter`` for filtered metrics),
      the shape of ``jaxtune eval``'s report.
    """
    manager = TaskManager(include_path=include_path)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        where = f" (with --include-path {include_path})" if include_path else ""
        raise ConfigError(
            f"--lm-eval: unknown lm-eval task(s) {', '.join(missing)}{where}; "
            "`lm-eval ls tasks` lists them"
        )
    lm = JaxtuneLM(**model_args)
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=True,
        task_manager=manager,
        apply_chat_template=apply_chat_template,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=None,  # nothing here uses torch: do not import it to seed it
        fewshot_random_seed=seed,
    )
    out = Path(out_dir)
    (out / "lm_eval_samples").mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", {}) or {}
    for task, rows in samples.items():
        text = "".join(json.dumps(r, default=handle_non_serializable) + "\n" for r in rows)
        atomic_file(out / "lm_eval_samples" / f"{task}.jsonl", text)
    atomic_file(
        out / "lm_eval_results.json",
        json.dumps(results, indent=2, default=handle_non_serializable) + "\n",
    )
    return {task: _numeric(m) for task, m in results["results"].items()}
