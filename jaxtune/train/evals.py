"""Evaluations the trainer runs besides the validation loss.

- :class:`TaskEvals`: ``eval.tasks`` (multiple-choice benchmarks, JSONL tasks, generation
  tasks, ``perplexity``) on the model being trained, with the same scorer as
  ``jaxtune eval``: once before the first step (``eval.at_start``), every ``eval.every``
  steps and after the last one (``eval.at_end``). Tasks are loaded and validated when
  the run starts, so a typo fails in a second instead of after training. Results are
  logged as ``tasks/<task>/<metric>`` (so ``checkpoint.best_metric`` and early stopping
  can watch them) and written to ``run_dir/eval/``: one JSON per evaluated step and a
  before/after ``eval_report.md``. The items of each task that share a 13-gram with the
  training split are found once, at the start, and listed in ``eval/contamination.json``
  and the report's Contamination section; with ``eval.decontaminate`` every
  multiple-choice task is also scored on its clean items, as ``tasks/<task>/clean/...``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
from flax import nnx

from jaxtune.atomic import atomic_file
from jaxtune.data.contamination import record_texts
from jaxtune.data.splits import load_split
from jaxtune.errors import ConfigError
from jaxtune.eval.contamination import clean_masks
from jaxtune.eval.generate import SamplingConfig
from jaxtune.eval.report import write_report
from jaxtune.eval.runner import default_max_len, load_tasks, parse_tasks, score_tasks

# Metrics for which a lower value is better; every other watched metric is maximised.
_LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "error", "rate", "repetition")


def lower_is_better(metric: str) -> bool:
    """Direction of a logged metric name, e.g. ``eval/loss`` (min), ``tasks/arc_easy/acc``."""
    leaf = metric.rsplit("/", 1)[-1]
    return any(k in leaf for k in _LOWER_IS_BETTER)


def improved(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (None = nothing yet)."""
    if best is None:
        return True
    return value < best if lower_is_better(metric) else value > best


def flat_task_metrics(results: dict[str, dict]) -> dict[str, float]:
    """``{task: {metric: v}}`` -> ``{"tasks/task/metric": v}`` for numeric values."""
    out = {}
    for task, metrics in results.items():
        for k, v in metrics.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                out[f"tasks/{task}/{k}"] = float(v)
    return out


class TaskEvals:
    """Runs ``cfg.eval.tasks`` on the trained model at chosen steps.

    Args:
      cfg: the run config.
      tokenizer: the model's tokenizer.
      datasets: tokenized splits (``validation`` feeds ``perplexity``).
      graphdef: the model's graph (``nnx.split``), merged with the live weights for each
        evaluation, so nothing is copied.
      run_dir: where ``eval/`` goes.
      total_steps: the run's last step (for ``at_end``).

    Raises:
      ConfigError / DataError: an unknown task or a bad task file (at construction).
    """

    def __init__(self, cfg, tokenizer, datasets: dict, graphdef, run_dir: Path, total_steps: int):

        self.cfg, self.tokenizer, self.graphdef = cfg, tokenizer, graphdef
        self.names = parse_tasks(cfg.eval.tasks) if cfg.eval.tasks else []
        self.total_steps = total_steps
        self.dir = Path(run_dir) / "eval"
        self.loaded = {}
        self.clean: dict[str, list[bool]] | None = None
        self.contamination: dict[str, dict] = {}
        if not self.names:
            return
        if jax.process_count() > 1:
            # The scorer feeds host-local numpy batches to a jitted forward pass; over
            # several hosts every process would need the same items in lockstep.
            raise ConfigError(
                "eval.tasks during training runs on one host; on a multi-host run leave it "
                "empty and run `jaxtune eval RUN_DIR --tasks ...` afterwards"
            )
        self.loaded = load_tasks(
            self.names,
            limit=cfg.eval.max_items,
            num_fewshot=cfg.eval.num_fewshot,
            eval_data=datasets.get("validation"),
        )
        # One pass over the raw training records (~15 s per 100k of 200 words), before the
        # first step; none when the tasks are only perplexity.
        train = load_split(cfg.data, "train")
        if train is not None:
            masks, self.contamination = clean_masks(
                self.names, record_texts(train), limit=cfg.eval.max_items
            )
            self.clean = masks if cfg.eval.decontaminate else None

    def __bool__(self) -> bool:
        return bool(self.loaded)

    def due(self, step: int) -> bool:
        """Whether to evaluate after optimizer step ``step`` (0 = before training)."""
        if not self.loaded:
            return False
        if step == 0:
            return self.cfg.eval.at_start and not (self.dir / "step_0.json").exists()
        every = self.cfg.eval.every
        return bool(every and step % every == 0) or (
            self.cfg.eval.at_end and step == self.total_steps
        )

    def run(self, step: int, params, frozen, log=print) -> dict[str, float]:
        """Scores every task on the current weights; returns flat ``tasks/...`` metrics."""

        model = nnx.merge(self.graphdef, params, frozen)
        cfg = self.cfg
        max_len = default_max_len(model)
        results = score_tasks(
            model,
            self.tokenizer,
            self.loaded,
            batch_size=cfg.eval.batch_size,
            max_len=max_len,
            sampling=SamplingConfig(max_new_tokens=cfg.eval.max_new_tokens),
            out_dir=self.dir / f"step_{step}",
            log=lambda m: log(f"[eval step {step}] {m}"),
            clean=self.clean,
        )
        if jax.process_index() == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.contamination and not (self.dir / "contamination.json").exists():
                atomic_file(
                    self.dir / "contamination.json", json.dumps(self.contamination, indent=1)
                )
                for task, c in self.contamination.items():
                    log(
                        f"[eval] contamination {task}: {c['contaminated']} of {c['items']} items "
                        f"share a {c['n']}-gram with the training data"
                    )
            tmp = self.dir / f".step_{step}.json.tmp"
            tmp.write_text(json.dumps(results, indent=2))
            tmp.replace(self.dir / f"step_{step}.json")
        return flat_task_metrics(results)

    def write_report(self, step: int) -> dict | None:
        """``eval/eval_report.{json,md}``: the last evaluation, beside step 0 if there is one."""

        last = self.dir / f"step_{step}.json"
        if not self.loaded or not last.exists() or jax.process_index() != 0:
            return None
        first = self.dir / "step_0.json"
        base = json.loads(first.read_text()) if first.exists() and step != 0 else None
        meta = {
            "model": self.cfg.model.path,
            "step": step,
            "base": "the same model before fine-tuning (step 0)" if base else None,
            "tasks": self.names,
            "num_fewshot": self.cfg.eval.num_fewshot,
            "limit": self.cfg.eval.max_items,
        }
        return write_report(
            self.dir,
            json.loads(last.read_text()),
            base=base,
            meta=meta,
            contamination=self.contamination,
        )
