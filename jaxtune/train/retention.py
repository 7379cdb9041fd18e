"""Retention: how much general ability a fine-tune keeps (catastrophic forgetting).

``eval.retention`` names multiple-choice benchmarks (default ARC-Easy and HellaSwag, the
first ``eval.retention_items`` items of each), scored zero-shot with jaxtune's
lm-evaluation-harness-compatible scorer on the model before the first step and again
after the last. Before the first step the model *is* the base model: LoRA and DoRA start
with a zero update, adapters as the identity, full fine-tuning from the base weights.
The headline number of a task is ``acc_norm`` for HellaSwag (how it is reported
everywhere) and ``acc`` otherwise; ``retention/change`` is the mean change of the
headline numbers over the tasks (after - before; negative = forgotten).

Files in ``run_dir/eval/``: ``retention_before.json`` (the base scores, written before the
first step, so a resumed run keeps them), ``retention.json`` (before, after and the
change per task, after the last step) and ``retention_contamination.json`` (the retention
items that share a 13-gram with the training split: a benchmark the run trained on
measures nothing).

Scoring the base model costs as much as scoring the trained one (about a minute for
SmolLM2-135M on two CPU cores), and it is the same for every run of a sweep. The base
scores are therefore cached in ``$JAXTUNE_CACHE/retention`` under a key of everything
that can change them: the model files (path, size, modification time), the ``model``
section, the PEFT method, the mesh, the backend, the tasks and the scorer's settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
from flax import nnx

from jaxtune import __version__
from jaxtune.atomic import atomic_file
from jaxtune.config import Config, config_to_dict
from jaxtune.data.contamination import record_texts
from jaxtune.data.splits import load_split
from jaxtune.errors import ConfigError
from jaxtune.eval.contamination import clean_masks
from jaxtune.eval.runner import default_max_len, load_tasks, parse_tasks, score_tasks
from jaxtune.resources import cache_dir, resolve_path

BEFORE = "retention_before.json"
RESULT = "retention.json"
CONTAMINATION = "retention_contamination.json"
# lm-evaluation-harness reports HellaSwag by its length-normalised accuracy; others by acc.
HEADLINE = {"hellaswag": "acc_norm"}
_CACHE_VERSION = 1


def headline(task: str) -> str:
    """The metric a retention task is summarised by (``acc_norm`` or ``acc``)."""
    return HEADLINE.get(task, "acc")


def _files(path: Path) -> list[list]:
    """(relative name, size, mtime_ns) of the model's file(s): a cheap identity that
    changes when any file is replaced, without reading gigabytes of weights."""
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    out = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            p = Path(root) / name
            st = p.stat()
            out.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
    return out


def cache_key(cfg: Config, names: list[str], mesh_shape: dict) -> str:
    """Key of the base model's retention scores: everything that can change them."""
    model = resolve_path(cfg.model.path)
    section = dict(config_to_dict(cfg)["model"])
    section["path"] = str(Path(model).resolve())
    payload = {
        "version": _CACHE_VERSION,
        "jaxtune": __version__,
        "files": _files(Path(model)),
        "model": section,
        # DoRA's identity at init is exact only up to float rounding: keep runs apart.
        "peft": cfg.peft.method,
        "mesh": mesh_shape,
        "backend": jax.default_backend(),
        "tasks": names,
        "items": cfg.eval.retention_items,
        "batch_size": cfg.eval.batch_size,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def summarize(before: dict, after: dict, names: list[str]) -> dict:
    """``retention.json``'s content from two ``{task: {metric: value}}`` results.

    Returns:
      ``{"tasks": {task: {"metric", "before", "after", "change", "n"}}, "before",
      "after", "change"}``: the headline metric per task and its mean over tasks.
    """
    tasks = {}
    for t in names:
        m = headline(t)
        b, a = before[t].get(m), after[t].get(m)
        tasks[t] = {"metric": m, "before": b, "after": a, "change": a - b, "n": after[t].get("n")}
    mean = lambda k: sum(v[k] for v in tasks.values()) / len(tasks)  # noqa: E731
    return {
        "tasks": tasks,
        "before": mean("before"),
        "after": mean("after"),
        "change": mean("change"),
    }


def flat_metrics(result: dict) -> dict[str, float]:
    """``retention/change``, ``retention/before``, ``retention/after`` and
    ``retention/<task>/<metric>`` (after), for the summary and sweep tables."""
    out = {f"retention/{k}": float(result[k]) for k in ("change", "before", "after")}
    for t, v in result["tasks"].items():
        out[f"retention/{t}/{v['metric']}"] = float(v["after"])
    return out


class Retention:
    """Scores ``cfg.eval.retention`` before the first step and after the last.

    Args:
      cfg: the run config.
      tokenizer: the model's tokenizer.
      graphdef: the model's graph (``nnx.split``), merged with the live weights.
      run_dir: where ``eval/`` goes.
      language_model: False for tasks whose model is not a causal LM (classifier heads):
        retention does not apply there.
      mesh_shape: ``{axis: size}`` of the run's mesh (part of the cache key).
      log: where progress lines go.

    Raises:
      ConfigError: a retention task that is unknown or not multiple-choice (at
        construction, before anything is written).
    """

    def __init__(
        self,
        cfg: Config,
        tokenizer,
        graphdef,
        run_dir: Path,
        *,
        language_model: bool,
        mesh_shape: dict,
        log: Callable[[str], None] = print,
    ):
        self.cfg, self.tokenizer, self.graphdef, self.log = cfg, tokenizer, graphdef, log
        self.dir = Path(run_dir) / "eval"
        self.loaded: dict = {}
        self.names: list[str] = []
        if not cfg.eval.retention or not language_model:
            return
        self.names = parse_tasks(cfg.eval.retention)
        kinds = {n: "perplexity" for n in self.names if n == "perplexity"}
        if not kinds:
            loaded = load_tasks(self.names, limit=cfg.eval.retention_items, num_fewshot=0)
            kinds = {k: kind for k, (kind, _) in loaded.items() if kind != "choice"}
        for key, kind in kinds.items():
            raise ConfigError(
                f"eval.retention: {key} is a {kind} task; retention scores multiple-choice "
                'tasks (e.g. [arc_easy, hellaswag], a JSONL file of {"context", "choices", '
                '"label"}), or [] turns it off'
            )
        self.names = list(loaded)
        if jax.process_count() > 1:
            # The scorer feeds host-local batches to a jitted forward pass (as eval.tasks).
            log("[retention] skipped: it runs on one host; score the run afterwards instead")
            return
        self.loaded = loaded
        train = load_split(cfg.data, "train")
        self.contamination = (
            clean_masks(self.names, record_texts(train), limit=cfg.eval.retention_items)[1]
            if train is not None
            else {}
        )
        self.key = cache_key(cfg, self.names, mesh_shape)
        self.cache = cache_dir() / "retention" / f"{self.key}.json"

    def __bool__(self) -> bool:
        return bool(self.loaded)

    def _score(self, params, frozen, label: str) -> dict:
        model = nnx.merge(self.graphdef, params, frozen)
        return score_tasks(
            model,
            self.tokenizer,
            self.loaded,
            batch_size=self.cfg.eval.batch_size,
            max_len=default_max_len(model),
            log=lambda m: self.log(f"[retention {label}] {m}"),
        )

    def before(self, params, frozen) -> None:
        """Scores the model at step 0 (the base) unless the run or the cache has it."""
        if not self or (self.dir / BEFORE).exists():
            return
        record = _read(self.cache)
        if record is not None and record.get("tasks") == self.names:
            self.log(f"[retention] base model scores from the cache ({self.cache})")
            record["source"] = f"cache {self.cache}"
        else:
            record = {
                "tasks": self.names,
                "items": self.cfg.eval.retention_items,
                "results": self._score(params, frozen, "before"),
                "source": "scored at step 0",
            }
            if jax.process_index() == 0:
                self.cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_file(self.cache, json.dumps(record, indent=1))
        if jax.process_index() == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_file(self.dir / BEFORE, json.dumps(record, indent=1))
            if self.contamination:
                atomic_file(self.dir / CONTAMINATION, json.dumps(self.contamination, indent=1))
            for task, c in self.contamination.items():
                if c["contaminated"]:
                    self.log(
                        f"[retention] {task}: {c['contaminated']} of {c['items']} items share a "
                        f"{c['n']}-gram with the training data"
                    )

    def after(self, step: int, params, frozen) -> dict[str, float]:
        """Scores the trained model, writes ``retention.json``; flat metrics (or {})."""
        if not self:
            return {}
        record = _read(self.dir / BEFORE) or _read(self.cache)
        if record is None or record.get("tasks") != self.names:
            self.log(
                "[retention] no base scores for these tasks (the run started with other "
                "eval.retention settings): skipped"
            )
            return {}
        after = self._score(params, frozen, "after")
        result = summarize(record["results"], after, self.names)
        result.update(step=step, items=record["items"], before_source=record.get("source"))
        if jax.process_index() == 0:
            atomic_file(self.dir / RESULT, json.dumps(result, indent=1))
        parts = [
            f"{t} {v['metric']} {v['before']:.3f} -> {v['after']:.3f}"
            for t, v in result["tasks"].items()
        ]
        self.log(f"[retention] {', '.join(parts)}; mean change {result['change']:+.4f}")
        return flat_metrics(result)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
