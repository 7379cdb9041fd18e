"""Pairwise comparison of M models on one prompt set: generate, judge every pair, rate.

``compare_models(models, prompts_file, judge, out)`` generates an answer per prompt from
each model (one model in memory at a time, prompts batched), judges every pair of models
on every prompt (:mod:`jaxtune.eval.judges`), and writes to ``out`` (atomically, as one
directory): ``samples.jsonl``, ``judgments.jsonl``, ``results.json`` / ``results.md``
(win / tie / loss matrix and Elo ratings with bootstrap intervals, :mod:`jaxtune.eval.elo`),
``compare.html`` (the answers side by side) and ``ratings.png``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from jaxtune.atomic import atomic_dir, check_out_dir
from jaxtune.errors import ConfigError, DataError, JaxtuneError
from jaxtune.eval import elo
from jaxtune.eval.compare_report import write_html, write_markdown, write_plot
from jaxtune.eval.generate import SamplingConfig
from jaxtune.eval.judges import (
    METRICS,
    Template,
    check_references,
    combine_orders,
    metric_judgment,
    model_verdicts,
)
from jaxtune.eval.runner import Progress, read_generation_task, run_generation
from jaxtune.loading import from_pretrained, load_tokenizer, model_kind
from jaxtune.resources import resolve_path


def _jsonl(records: Sequence[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def check_models(models: Sequence[str], judge: str) -> str:
    """Validates the model list and the judge before anything loads; returns the judge kind.

    Returns:
      ``"metric"`` for exact / f1 / rougeL, ``"model"`` for a judge model path.
    """
    if len(models) < 2:
        raise ConfigError(f"--models: got {len(models)} model, expected two or more (A,B,...)")
    if len(set(models)) != len(models):
        raise ConfigError("--models: a model is listed twice")
    for m in models:
        model_kind(resolve_path(m))  # a missing path fails now, not after generating
    if judge in METRICS:
        return "metric"
    low = {m.lower(): m for m in METRICS}
    if judge.lower() in low:
        raise ConfigError(f"--judge: got {judge!r}; did you mean {low[judge.lower()]!r}?")
    try:
        model_kind(resolve_path(judge))
    except JaxtuneError as e:
        raise ConfigError(
            f"--judge: {judge!r} is neither a metric ({', '.join(METRICS)}) nor a model path ({e})"
        ) from None
    return "model"


def generate_all(
    models: Sequence[str],
    rows: list[dict],
    sampling: SamplingConfig,
    *,
    chat: bool,
    stop: Sequence[str],
    batch_size: int,
    dtype: str,
    say: Callable[[str], None],
) -> list[list[str]]:
    """Each model's answers: M lists of P strings (one model loaded at a time)."""
    outputs = []
    for i, path in enumerate(models):
        say(f"== model {i + 1}/{len(models)}: {path}")
        model = from_pretrained(path, dtype=dtype)
        tokenizer = load_tokenizer(path)
        bar = Progress(f"generate {i + 1}/{len(models)}", unit="prompt")
        metrics, samples = run_generation(
            model,
            tokenizer,
            rows,
            sampling,
            batch_size=batch_size,
            chat=chat,
            stop=stop,
            progress=bar,
        )
        bar.close()
        say(f"   {metrics['tokens_per_sec']:.1f} tokens/s")
        outputs.append([s["output"] for s in samples])
        del model
        jax.clear_caches()  # the next model's shapes differ; free this one's executables
    return outputs


def judge_all(
    judge: str,
    kind: str,
    rows: list[dict],
    outputs: list[list[str]],
    *,
    template: Template,
    chat: bool,
    dtype: str,
    batch_size: int,
) -> list[dict]:
    """One judgment record per (prompt, pair): ``{"id", "pair", "outcome", ...}``."""
    pairs = elo.pairs_of(len(outputs))
    if kind == "metric":
        return [
            {
                "id": p,
                "pair": [i, j],
                **metric_judgment(judge, outputs[i][p], outputs[j][p], r["reference"]),
            }
            for p, r in enumerate(rows)
            for i, j in pairs
        ]
    texts, keys = [], []
    for p, r in enumerate(rows):
        for i, j in pairs:
            for order, (x, y) in (("ab", (i, j)), ("ba", (j, i))):
                texts.append(
                    template.render(r["prompt"], outputs[x][p], outputs[y][p], r["reference"])
                )
                keys.append((p, i, j, order))
    model = from_pretrained(judge, dtype=dtype)
    tokenizer = load_tokenizer(judge)
    bar = Progress("judge", unit="verdict")
    verdicts = model_verdicts(
        model, tokenizer, texts, chat=chat, batch_size=batch_size, progress=bar
    )
    bar.close()
    found: dict[tuple[int, int, int], dict] = {}
    for (p, i, j, order), v in zip(keys, verdicts, strict=True):
        rec = found.setdefault((p, i, j), {"id": p, "pair": [i, j], "verdicts": {}, "logprobs": {}})
        rec["verdicts"][order] = v["verdict"]
        rec["logprobs"][order] = v["logprob"]
    out = []
    for rec in found.values():
        rec["outcome"] = combine_orders(rec["verdicts"]["ab"], rec["verdicts"]["ba"])
        out.append(rec)
    return out


def summarize(
    labels: Sequence[str], judgments: list[dict], n_prompts: int, *, bootstrap: int, seed: int
) -> dict:
    """Win / tie / loss matrix, win rates and Elo ratings (see :mod:`jaxtune.eval.elo`)."""
    m = len(labels)
    outcomes = elo.outcome_array(judgments, n_prompts, m)
    matrix = elo.win_matrix(outcomes, m)
    ratings = elo.elo_ratings(outcomes, m, bootstrap=bootstrap, seed=seed)
    games = matrix["wins"] + matrix["ties"] + matrix["losses"]
    score = (matrix["wins"] + 0.5 * matrix["ties"]).sum(1) / games.sum(1).clip(min=1)
    order = sorted(range(m), key=lambda i: -ratings["rating"][i])

    def num(x: float):
        return None if x != x else round(float(x), 1)

    return {
        "models": list(labels),
        "n_prompts": n_prompts,
        "matrix": {k: v.tolist() for k, v in matrix.items()},
        "elo": {
            "anchor": f"mean rating {elo.ELO_MEAN:g} (Bradley-Terry MLE, ties = half a win)",
            "bootstrap": bootstrap,
            "seed": seed,
            "models": [
                {
                    "model": labels[i],
                    "rating": num(ratings["rating"][i]),
                    "low": num(ratings["low"][i]),
                    "high": num(ratings["high"][i]),
                    "score": round(float(score[i]), 4),
                }
                for i in order
            ],
        },
    }


def compare_models(
    models: Sequence[str],
    prompts: str,
    judge: str,
    out: str,
    *,
    sampling: SamplingConfig | None = None,
    chat: bool = False,
    judge_chat: bool = False,
    stop: Sequence[str] = (),
    bootstrap: int = 1000,
    seed: int = 0,
    template: str | None = None,
    batch_size: int = 8,
    dtype: str = "float32",
    overwrite: bool = False,
    say: Callable[[str], None] | None = None,
) -> dict:
    """Generates from each model, judges every pair on every prompt, writes ``out``.

    Args:
      models: M >= 2 model paths (anything :func:`jaxtune.loading.from_pretrained` loads).
      prompts: JSONL file of ``{"prompt", "reference" (optional)}`` rows (P prompts).
      judge: ``exact``, ``f1``, ``rougeL`` (need references) or a judge model path.
      out: output directory (must be empty, or an earlier output with ``overwrite``).
      sampling: decoding options (default greedy, 64 new tokens; ``seed`` applies).
      chat: render the prompts with each model's chat template (as the models were tuned).
      judge_chat: render the judging prompt as a user turn of the judge's chat template.
      template: judge template file (model judge; default :data:`judges.DEFAULT_TEMPLATE`).
      bootstrap: prompt resamples for the Elo intervals (0: none).

    Returns:
      The ``results.json`` content plus ``"files"`` (paths written).
    """
    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    sampling = (sampling or SamplingConfig(64, 0.0, 0, 1.0, seed)).check()
    if bootstrap < 0:
        raise ConfigError(f"--bootstrap: got {bootstrap}, expected >= 0")
    # Everything that can be wrong with the input fails here, before a model loads.
    kind = check_models(models, judge)
    if not Path(prompts).is_file():
        raise DataError(f"--prompts: {prompts}: no such file")
    rows = read_generation_task(prompts)
    if kind == "metric":
        check_references(judge, rows, prompts)
    tpl = Template()
    if template is not None:
        try:
            text = Path(template).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"--judge-template: {template}: {e.strerror or e}") from None
        tpl = Template(text, template)
    # A chat template missing from the last model (or the judge) fails now, not after
    # generating from the others.
    needs_template = [m for m in models if chat] + (
        [judge] if kind == "model" and judge_chat else []
    )
    for path in needs_template:
        if not getattr(load_tokenizer(path), "chat_template", None):
            flag = "--judge-chat" if path == judge and judge_chat else "--chat"
            raise ConfigError(f"{flag} given, but {path}'s tokenizer has no chat template")
    check_out_dir(out, overwrite)
    t0 = time.perf_counter()
    outputs = generate_all(
        models, rows, sampling, chat=chat, stop=stop, batch_size=batch_size, dtype=dtype, say=say
    )
    if kind == "model":
        say(f"== judge: {judge}")
    judgments = judge_all(
        judge,
        kind,
        rows,
        outputs,
        template=tpl,
        chat=judge_chat,
        dtype=dtype,
        batch_size=batch_size,
    )
    results = summarize(models, judgments, len(rows), bootstrap=bootstrap, seed=seed)
    for j in judgments:  # names beside the indices, for a reader of the file
        j["models"] = [models[j["pair"][0]], models[j["pair"][1]]]
    results["judge"] = judge
    results["generation"] = {
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "seed": sampling.seed,
        "chat": chat,
    }
    if kind == "model":
        results["judge_chat"] = judge_chat
    results["seconds"] = round(time.perf_counter() - t0, 1)
    samples = [
        {
            "id": p,
            "prompt": r["prompt"],
            "reference": r["reference"],
            "outputs": {m: outputs[i][p] for i, m in enumerate(models)},
        }
        for p, r in enumerate(rows)
    ]
    names = [
        "samples.jsonl",
        "judgments.jsonl",
        "results.json",
        "results.md",
        "compare.html",
        "ratings.png",
    ]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "samples.jsonl").write_text(_jsonl(samples), encoding="utf-8")
        (tmp / "judgments.jsonl").write_text(_jsonl(judgments), encoding="utf-8")
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        write_markdown(tmp / "results.md", results)
        write_html(tmp / "compare.html", results, samples, judgments)
        write_plot(tmp / "ratings.png", results)
    results["files"] = [str(Path(out) / n) for n in names]
    return results
