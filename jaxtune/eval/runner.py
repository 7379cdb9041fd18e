"""Run a set of evaluation tasks on a model: ``run_tasks(model, tokenizer, tasks) -> dict``.

Task kinds (a name or a file path each):

* multiple choice: ``arc_easy``, ``arc_challenge``, ``hellaswag``, ``boolq``, ``mmlu``
  (all subjects: ``mmlu`` is their macro average, each subject also reported as
  ``mmlu_<subject>``), ``mmlu_<subject>``, or a JSONL file of
  ``{"context", "choices", "label"}`` -> ``acc``, ``acc_norm``, ``acc_stderr``, ``n``;
* generation: a JSONL file of ``{"prompt": str, "reference": str | [str] (optional)}`` ->
  error-analysis metrics (exact match, F1, lengths, repetition, empty / truncated rates)
  and ``tokens_per_sec``;
* ``perplexity``: held-out loss on ``eval_data`` (a tokenized split) -> ``loss``,
  ``perplexity``, ``tokens``;
* counterfactual bias probe: ``counterfactual`` (the built-in probe),
  ``counterfactual:FILE`` or a JSONL file of ``{"attribute", "variants"}`` groups
  (:mod:`jaxtune.eval.counterfactual`) -> per attribute, a language model's
  ``<attribute>/logprob_gap`` (+ ``_per_token``), a sequence classifier's
  ``<attribute>/flip_rate`` and ``score_gap``, with the ``favoured`` value.

Every task name and task file is validated before anything runs, so a typo or a bad
line fails in a second, not after an hour of scoring.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from jaxtune.errors import ConfigError, DataError
from jaxtune.eval import counterfactual as CF
from jaxtune.eval import tasks as T
from jaxtune.eval.analysis import analyze_generations, flat_metrics
from jaxtune.eval.bias_probe import load_probe, run_probe
from jaxtune.eval.generate import SamplingConfig, generate_text
from jaxtune.eval.multiple_choice import accuracy_metrics, evaluate_items, grouped_metrics
from jaxtune.eval.perplexity import evaluate_loss

PERPLEXITY = ("perplexity", "ppl")
COUNTERFACTUAL = "counterfactual"
# Shown first on a task's console line (every other metric follows in its own order).
HEADLINE = ("acc", "acc_norm", "exact_match", "f1", "loss", "perplexity")


class Progress:
    """Progress of one task on ``stream`` (stderr): items done, items/s and the ETA.

    On a terminal a tqdm bar; otherwise (a log file, CI) one plain line each time
    another tenth of the items is done, so a log shows the pace without a bar's
    carriage returns. Call it as ``progress(done, total)``; :meth:`close` at the end.
    """

    def __init__(self, name: str, stream: TextIO | None = None, unit: str = "item"):
        self.name, self.unit = name, unit
        self.stream = stream if stream is not None else sys.stderr
        self.bar = None
        self.t0 = time.perf_counter()
        self.shown = 0  # tenths already reported (plain lines)
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())

    def __call__(self, done: int, total: int) -> None:
        if self.tty:
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(
                    total=total, desc=self.name, unit=self.unit, file=self.stream, leave=False
                )
            self.bar.update(done - self.bar.n)
            return
        tenth = 10 * done // max(total, 1)
        if tenth <= self.shown:
            return
        self.shown = tenth
        secs = time.perf_counter() - self.t0
        rate = done / max(secs, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        shown = f"{rate:.1f}" if rate >= 1 else f"{rate:.3f}"  # slow tasks: not "0.0"
        print(
            f"  {self.name}: {done}/{total} {self.unit}s ({100 * done // max(total, 1)}%), "
            f"{shown} {self.unit}s/s, ETA {_duration(eta)}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def metrics_line(metrics: dict) -> str:
    """Every metric of a task, headline metrics first: ``acc 0.5000, acc_norm ...``."""
    keys = [k for k in HEADLINE if k in metrics] + [k for k in metrics if k not in HEADLINE]
    return ", ".join(
        f"{k} {metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
        for k in keys
    )


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"a,b, c"`` or a list -> validated, de-duplicated task names (files kept as paths)."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        if name in PERPLEXITY:
            name = "perplexity"
        elif probe_source(name) is None:
            name = T.resolve_task(name)
        if name not in out:
            out.append(name)
    if not out:
        raise ConfigError("no evaluation tasks given (e.g. --tasks arc_easy,hellaswag)")
    return out


def probe_source(name: str) -> str | None:
    """``builtin`` for ``counterfactual``, the path of ``counterfactual:PATH`` or of a
    file task whose first row has ``variants``; None for any other task."""
    if name == COUNTERFACTUAL:
        return "builtin"
    if name.startswith(COUNTERFACTUAL + ":"):
        return name[len(COUNTERFACTUAL) + 1 :]
    if T.is_file_task(name) and Path(name).is_file() and file_task_kind(name) == COUNTERFACTUAL:
        return name
    return None


def file_task_kind(path: str) -> str:
    """``"choice"``, ``"generate"`` or ``"counterfactual"``, from the first row's fields."""
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{no}: not valid JSON ({e.msg})") from None
            if isinstance(row, dict) and "variants" in row:
                return COUNTERFACTUAL
            pair = isinstance(row, dict) and ("chosen" in row or "rejected" in row)
            if isinstance(row, dict) and "prompt" in row and "choices" not in row and not pair:
                return "generate"
            return "choice"
    raise DataError(f"{path}: no items (expected one JSON object per line: {T.TASK_FIELDS})")


def read_generation_task(path: str) -> list[dict]:
    """Rows ``{"prompt", "reference"}`` of a generation task file (validated).

    ``answer`` is accepted as another name for ``reference``.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise DataError(
                    f'{where}: missing field \'prompt\' (expected {{"prompt": str, "reference": '
                    "str (optional)})"
                )
            if not row["prompt"].strip():
                raise DataError(f"{where}: field 'prompt' is empty (expected the text to continue)")
            ref = row.get("reference", row.get("answer"))
            ok = ref is None or isinstance(ref, str)
            ok = ok or (isinstance(ref, list) and all(isinstance(r, str) for r in ref))
            if not ok:
                raise DataError(f"{where}: field 'reference' must be a string or list of strings")
            rows.append({"prompt": row["prompt"], "reference": ref})
    return rows


def run_generation(
    model,
    tokenizer,
    rows: list[dict],
    sampling,
    *,
    batch_size: int = 8,
    chat: bool = False,
    stop: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict, list[dict]]:
    """Generates an answer per row and analyses them.

    Prompts are sorted by length and batched with a fixed batch shape (the last batch is
    filled with copies), so a task compiles once per prompt-length bucket.
    ``progress(done, total)`` is called after each batch.

    Returns:
      (flat metrics incl. ``tokens_per_sec``, per-sample records with text and flags).
    """

    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt"]))
    texts: list[str] = [""] * len(rows)
    reasons: list[str] = [""] * len(rows)
    counts: list[int] = [0] * len(rows)
    tokens = seconds = 0.0
    bs = max(1, min(batch_size, len(rows)))
    for start in range(0, len(order), bs):
        idx = order[start : start + bs]
        prompts = [rows[i]["prompt"] for i in idx]
        prompts += [prompts[-1]] * (bs - len(prompts))
        out, stats = generate_text(model, tokenizer, prompts, sampling, chat=chat, stop=stop)
        for r, i in enumerate(idx):
            texts[i] = out[r]
            reasons[i] = stats["finish_reasons"][r]
            counts[i] = stats["token_counts"][r]
        tokens += sum(stats["token_counts"][: len(idx)])
        seconds += stats["seconds"]
        if progress is not None:
            progress(min(start + bs, len(order)), len(order))
    analysis = analyze_generations(
        texts,
        references=[r["reference"] for r in rows],
        finish_reasons=reasons,
        token_counts=counts,
    )
    metrics = flat_metrics(analysis["summary"])
    metrics["tokens_per_sec"] = tokens / max(seconds, 1e-9)
    samples = [
        {"prompt": r["prompt"], "reference": r["reference"], "output": t, **s}
        for r, t, s in zip(rows, texts, analysis["samples"], strict=True)
    ]
    return metrics, samples


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def run_tasks(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    *,
    limit: int | None = None,
    num_fewshot: int = 0,
    seed: int = T.DEFAULT_FEWSHOT_SEED,
    batch_size: int = 32,
    max_len: int | None = None,
    eval_data=None,
    sampling=None,
    chat: bool = False,
    stop: Sequence[str] = (),
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = print,
    progress: bool = False,
    clean: Mapping[str, Sequence[bool]] | None = None,
) -> dict[str, dict]:
    """Runs evaluation tasks (``jaxtune eval``; the trainer loads once and scores often).

    Args:
      model: a causal LM (``jaxtune.from_pretrained(...)``, or the model being trained).
      tokenizer: its tokenizer (``jaxtune.load_tokenizer``).
      tasks: names / JSONL paths, as a list or a comma-separated string.
      limit: first N items per task (per subject for ``mmlu``); None = all.
      num_fewshot: k solved examples before each question (multiple-choice tasks).
      seed: few-shot sampling seed (the harness's 1234 by default).
      batch_size: (item, choice) rows per forward pass; generation prompts per batch is
        ``batch_size // 4`` (at least 1).
      max_len: token budget per scored sequence; default min(2048, model max positions).
      eval_data: a tokenized split (``TokenizedDataset``) for ``perplexity``.
      sampling: :class:`~jaxtune.eval.generate.SamplingConfig` for generation tasks.
      chat: render generation prompts with the chat template.
      stop: stop strings for generation tasks.
      out_dir: if given, per-item predictions / samples go to ``out_dir/predictions/``.
      log: a line per task with every metric (None = silent).
      progress: show each task's progress on stderr (:class:`Progress`).
      clean: ``eval.decontaminate``: ``{task: [clean?] per item}``
        (:func:`jaxtune.eval.contamination.clean_masks`); a multiple-choice task in it is
        also reported on its clean items, as ``{task}/clean``.

    Returns:
      ``{task: {metric: value}}``; multiple-choice tasks have ``acc``, ``acc_norm``,
      ``acc_stderr`` and ``n``; ``{task}/clean`` the same on the clean items plus
      ``removed`` (the contaminated items left out).

    Raises:
      ConfigError / DataError: unknown task, bad task file, ``perplexity`` without data.
    """
    names = parse_tasks(tasks)
    if max_len is None:
        max_len = default_max_len(model)
    loaded = load_tasks(names, limit=limit, num_fewshot=num_fewshot, seed=seed, eval_data=eval_data)
    return score_tasks(
        model,
        tokenizer,
        loaded,
        batch_size=batch_size,
        max_len=max_len,
        sampling=sampling,
        chat=chat,
        stop=stop,
        out_dir=out_dir,
        log=log,
        progress=progress,
        clean=clean,
    )


def default_max_len(model) -> int:
    """Token budget per scored sequence: min(2048, the model's max positions)."""
    return min(2048, int(getattr(model.config, "max_position_embeddings", 2048) or 2048))


def load_tasks(
    names: Sequence[str],
    *,
    limit: int | None = None,
    num_fewshot: int = 0,
    seed: int = T.DEFAULT_FEWSHOT_SEED,
    eval_data=None,
) -> dict[str, tuple[str, object]]:
    """Loads and validates every task before anything is scored.

    Args:
      names: from :func:`parse_tasks`.
      limit / num_fewshot / seed / eval_data: as in :func:`run_tasks`.

    Returns:
      ``{result key: (kind, payload)}`` with kind ``perplexity``, ``generate``,
      ``counterfactual`` or ``choice``; pass it to :func:`score_tasks` (as often as needed: the trainer loads
      once and scores at every evaluation).

    Raises:
      ConfigError / DataError: unknown task, bad task file, ``perplexity`` without data.
    """
    loaded: dict[str, tuple[str, object]] = {}
    for name in names:
        if name == "perplexity":
            if eval_data is None:
                raise ConfigError(
                    "task 'perplexity' needs held-out data: give a config with data.validation "
                    "(jaxtune eval CONFIG.yaml) or --data FILE"
                )
            loaded[name] = ("perplexity", eval_data)
        elif (source := probe_source(name)) is not None:
            key = COUNTERFACTUAL if source == "builtin" else T.file_task_name(source)
            loaded[key] = (COUNTERFACTUAL, load_probe(source))
        elif T.is_file_task(name) and file_task_kind(name) == "generate":
            rows = read_generation_task(name)
            loaded[T.file_task_name(name)] = ("generate", rows[:limit] if limit else rows)
        else:
            key = T.file_task_name(name) if T.is_file_task(name) else name
            items = T.load_task(name, num_fewshot=num_fewshot, seed=seed, limit=limit)
            loaded[key] = ("choice", items)
    return loaded


def score_tasks(
    model,
    tokenizer,
    loaded: dict[str, tuple[str, object]],
    *,
    batch_size: int = 32,
    max_len: int = 2048,
    sampling=None,
    chat: bool = False,
    stop: Sequence[str] = (),
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = print,
    progress: bool = False,
    clean: Mapping[str, Sequence[bool]] | None = None,
) -> dict[str, dict]:
    """Scores tasks loaded by :func:`load_tasks`; arguments and result as :func:`run_tasks`."""
    say = log or (lambda s: None)
    results: dict[str, dict] = {}
    out = Path(out_dir) if out_dir is not None else None
    for key, (kind, payload) in loaded.items():
        t0 = time.perf_counter()
        unit = "prompt" if kind == "generate" else "item"
        bars = progress and kind not in ("perplexity", COUNTERFACTUAL)
        bar = Progress(key, unit=unit) if bars else None
        try:
            _score_one(
                model,
                tokenizer,
                key,
                kind,
                payload,
                results,
                bar,
                batch_size=batch_size,
                max_len=max_len,
                sampling=sampling,
                chat=chat,
                stop=stop,
                out=out,
                clean=(clean or {}).get(key),
            )
        finally:
            if bar is not None:
                bar.close()
        say(f"{key}: {metrics_line(results[key])} ({time.perf_counter() - t0:.1f}s)")
        if f"{key}/clean" in results:
            say(f"{key}/clean: {metrics_line(results[f'{key}/clean'])}")
    return results


def clean_metrics(key: str, preds: Sequence[dict], clean: Sequence[bool]) -> dict:
    """A multiple-choice task's metrics on its clean items only (``eval.decontaminate``).

    Args:
      key: the task's result key (``mmlu``: the macro average over subjects).
      preds: N per-item prediction records, in item order.
      clean: N flags, True = no overlap with the training data.

    Returns:
      The task's metrics over the clean items, plus ``removed`` (contaminated items).
    """
    if len(clean) != len(preds):
        raise DataError(
            f"{key}: decontamination mask has {len(clean)} items, the task {len(preds)}"
        )
    kept = [p for p, ok in zip(preds, clean, strict=True) if ok]
    m = grouped_metrics(key, kept)[key] if key == "mmlu" else accuracy_metrics(kept)
    return {**m, "removed": len(preds) - len(kept)}


def _score_one(model, tokenizer, key: str, kind: str, payload, results: dict, bar, **opts) -> None:
    """Scores one loaded task into ``results`` (``mmlu``: also its subjects)."""

    batch_size, out = opts["batch_size"], opts["out"]
    if kind == "perplexity":
        m = evaluate_loss(model, payload, batch_size=max(1, batch_size // 4))
        results[key] = {k: m[k] for k in ("loss", "perplexity", "tokens")}
    elif kind == COUNTERFACTUAL:
        result = run_probe(
            model, tokenizer, payload, batch_size=batch_size, max_len=opts["max_len"]
        )
        results[key] = CF.flat_metrics(result)
        if out is not None:
            rows = [{"attribute": a, **m} for a, m in result.items()]
            _write_jsonl(out / "predictions" / f"{key}.jsonl", rows)
    elif kind == "generate":
        m, samples = run_generation(
            model,
            tokenizer,
            payload,
            opts["sampling"] or SamplingConfig(),
            batch_size=max(1, batch_size // 4),
            chat=opts["chat"],
            stop=opts["stop"],
            progress=bar,
        )
        results[key] = m
        if out is not None:
            _write_jsonl(out / "predictions" / f"{key}.jsonl", samples)
    else:
        metrics, preds = evaluate_items(
            model,
            tokenizer,
            payload,
            batch_size=batch_size,
            max_len=opts["max_len"],
            progress=bar,
        )
        if key == "mmlu":
            grouped = grouped_metrics("mmlu", preds)
            results["mmlu"] = grouped.pop("mmlu")  # the macro average first, then subjects
            results.update(grouped)
        else:
            results[key] = metrics
        if opts["clean"] is not None:
            results[f"{key}/clean"] = clean_metrics(key, preds, opts["clean"])
        if out is not None:
            _write_jsonl(out / "predictions" / f"{key}.jsonl", preds)
