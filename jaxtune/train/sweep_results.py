"""The results of a sweep: one row per run read back from its directory, the table, the plots.

:mod:`jaxtune.train.sweep` runs the sweep and calls :func:`write_results` after every run;
``jaxtune sweep --collect`` calls :func:`collect`. Rows come from each run's
``summary.json`` and ``metrics.jsonl`` only, so a sweep split over machines (``--shard``)
collects to the same table as one whole sweep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from jaxtune.atomic import atomic_file
from jaxtune.config_yaml import parse_yaml
from jaxtune.errors import ConfigError

PLAN = "sweep.json"
RESULTS = "results.json"
DEFAULT_METRIC = "final_eval_loss"
# Row keys that are not metrics of the run (the rest of a row's numbers are).
_FIXED = (
    "name",
    "overrides",
    "status",
    "error",
    "steps",
    "final_train_loss",
    "best_eval_loss",
    "final_eval_loss",
    "trainable_params",
    "wall_time_s",
    "tokens_per_sec",
    "retention",  # results.json only; results.md shows retention_change
)
_FINISHED = ("completed", "early stopped")


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its directory name and its ``key=value`` overrides."""

    name: str
    overrides: tuple[str, ...]

    def values(self) -> dict[str, Any]:
        """The swept values as YAML reads them (``1e-4`` -> 0.0001)."""
        out = {}
        for o in self.overrides:
            key, _, text = o.partition("=")
            out[key] = yaml_value(text, o)
        return out


def yaml_value(text: str, where: str) -> Any:
    """A grid value as YAML reads it (``1e-4`` -> 0.0001); ``where`` names it in errors."""
    return parse_yaml(text, f"--grid {where!r}")[0] if text.strip() else None


def read_json(path: Path):
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _status(summary: dict | None) -> str:
    reason = str(summary.get("stop_reason", "completed")) if summary else ""
    if reason == "completed":
        return "completed"
    if reason.startswith("early stopping"):
        return "early stopped"
    return "stopped"


def finished(run_dir: Path) -> bool:
    """Whether the run completed (or stopped early): its ``summary.json`` says so."""
    summary = read_json(run_dir / "summary.json")
    return isinstance(summary, dict) and _status(summary) in _FINISHED


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def result_row(run: SweepRun, out: Path, error: str | None = None) -> dict:
    """The results row of one run, read from its directory (``pending`` if none)."""
    run_dir = out / run.name
    summary = read_json(run_dir / "summary.json")
    summary = summary if isinstance(summary, dict) else None
    rows = _metrics(run_dir)
    if error is not None:
        status = "failed"
    elif summary is not None:
        status = _status(summary)
    else:
        status = "unfinished" if rows else "pending"
    evals = [v for r in rows if (v := _num(r.get("eval/loss"))) is not None]
    losses = [v for r in rows if (v := _num(r.get("loss"))) is not None]
    speeds = [v for r in rows if r.get("step", 0) > 1 and (v := _num(r.get("tokens_per_sec")))]
    speeds = speeds or [v for r in rows if (v := _num(r.get("tokens_per_sec")))]
    row: dict[str, Any] = {
        "name": run.name,
        "overrides": run.values(),
        "status": status,
        "steps": rows[-1].get("step") if rows else None,
        "final_train_loss": losses[-1] if losses else None,
        "best_eval_loss": min(evals) if evals else None,
        "final_eval_loss": evals[-1] if evals else None,
    }
    if error is not None:
        row["error"] = error
    if summary is not None:
        row["steps"] = summary.get("steps", row["steps"])
        ev = summary.get("eval") or {}
        for k, v in sorted(ev.items()):
            # eval/tokens is how many tokens were scored, not a result of the run.
            skip = k == "eval/loss" or k.endswith("/tokens") or k.startswith("retention/")
            if not skip and _num(v) is not None:
                row[k] = v
        # One column (the mean change); every number of it in results.json.
        retention = {k.split("/", 1)[1]: v for k, v in ev.items() if k.startswith("retention/")}
        if retention:
            row["retention_change"] = retention.get("change")
            row["retention"] = retention
    params = (summary or {}).get("params") or {}
    row["trainable_params"] = params.get("trainable")
    row["wall_time_s"] = (summary or {}).get("seconds")
    row["tokens_per_sec"] = statistics.median(speeds) if speeds else None
    return row


def metric_mode(metric: str, mode: str | None) -> str:
    if mode is not None:
        if mode not in ("min", "max"):
            raise ConfigError(f"--mode {mode}: expected min or max")
        return mode
    low = ("loss", "perplexity", "ppl", "error", "ece")
    return "min" if any(s in metric.lower() for s in low) else "max"


def _metric_key(metric: str) -> str:
    return {"eval/loss": "final_eval_loss", "loss": "final_train_loss"}.get(metric, metric)


def best_run(rows: list[dict], metric: str, mode: str) -> str | None:
    """The name of the best run by ``metric`` (``min`` / ``max``), None if none has it."""
    key = _metric_key(metric)
    scored = [(r[key], r["name"]) for r in rows if _num(r.get(key)) is not None]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda t: t[0])[1]


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | dict):
        return json.dumps(v)
    return str(v)


def results_markdown(rows: list[dict], metric: str, mode: str) -> str:
    """``results.md``: one table row per run, the best run marked."""
    best = best_run(rows, metric, mode)
    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    extra = sorted({k for r in rows for k in r if k not in _FIXED})
    cols = [
        ("final train loss", "final_train_loss"),
        ("best eval loss", "best_eval_loss"),
        ("final eval loss", "final_eval_loss"),
        *[(k, k) for k in extra],
        ("trainable params", "trainable_params"),
        ("wall s", "wall_time_s"),
        ("tokens/s", "tokens_per_sec"),
    ]
    head = ["best", "run", *keys, "status", "steps", *[c for c, _ in cols]]
    lines = [
        "# Sweep results",
        "",
        f"Best run by `{metric}` ({'lower' if mode == 'min' else 'higher'} is better): "
        + (f"**{best}**" if best else "none (no run has this metric)"),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [
            "**best**" if r["name"] == best else "",
            f"**{r['name']}**" if r["name"] == best else r["name"],
            *[_fmt(r["overrides"].get(k)) for k in keys],
            r["status"],
            _fmt(r.get("steps")),
            *[_fmt(r.get(k)) for _, k in cols],
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {r['name']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def _save_png(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_file(path, buf.getvalue())


def _is_log(key: str, xs: list[float]) -> bool:
    last = key.rpartition(".")[2]
    spans = min(xs) > 0 and max(xs) / min(xs) > 10
    return last in ("lr", "learning_rate") or spans


def plot_results(out: Path, rows: list[dict], metric: str) -> list[Path]:
    """``metric_vs_<key>.png`` per numeric swept key and ``validation_curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    key = _metric_key(metric)
    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    have = [r for r in rows if _num(r.get(key)) is not None]
    for k in keys:
        if not have or not all(_num(r["overrides"].get(k)) is not None for r in have):
            continue
        others = [o for o in keys if o != k]
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in have:
            label = ", ".join(f"{o}={_fmt(r['overrides'].get(o))}" for o in others)
            groups.setdefault(label, []).append((float(r["overrides"][k]), float(r[key])))
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for label, pts in groups.items():
            pts.sort()
            ax.plot(*zip(*pts, strict=True), "o-", label=label or None)
        xs = [float(r["overrides"][k]) for r in have]
        if _is_log(k, xs):
            ax.set_xscale("log")
        ax.set_xlabel(k)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if any(groups):
            ax.legend(fontsize=8)
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", k)
        files.append(_save_png(fig, out / f"metric_vs_{safe}.png"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for r in rows:
        pts = [(m["step"], m["eval/loss"]) for m in _metrics(out / r["name"]) if "eval/loss" in m]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", ms=3, label=r["name"])
            drawn += 1
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss of every run" if drawn else "no run has validation data")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    files.append(_save_png(fig, out / "validation_curves.png"))
    return files


def write_results(out: str | Path, rows: list[dict], metric: str, mode: str) -> dict:
    """Writes ``results.json``, ``results.md`` and the plots (atomically) into ``out``.

    Returns ``{"rows", "best", "files"}``: the rows, the best run's name (None if no
    run has ``metric``) and the files written.
    """
    out = Path(out)
    files = [
        atomic_file(out / RESULTS, json.dumps(rows, indent=1, default=str)),
        atomic_file(out / "results.md", results_markdown(rows, metric, mode)),
    ]
    files += plot_results(out, rows, metric)
    return {"rows": rows, "best": best_run(rows, metric, mode), "files": files}


def collect(out: str | Path, metric: str | None = None, mode: str | None = None) -> dict:
    """Merges the shards of a sweep in ``out`` into ``results.json`` / ``.md`` / plots.

    Every run of ``out/sweep.json`` is read back from its directory (so the result is
    the same as one whole sweep's); a run without one takes its status (e.g. ``failed``)
    from a shard's ``results.shard-*.json``, else it is ``pending``.

    Raises:
      ConfigError: ``out`` holds no ``sweep.json``.
    """
    out = Path(out)
    plan = read_json(out / PLAN)
    if not isinstance(plan, dict) or "runs" not in plan:
        raise ConfigError(f"--collect {out}: no sweep there ({out / PLAN} is missing)")
    if metric is None:
        metric = plan.get("metric") or DEFAULT_METRIC
        mode = mode or plan.get("mode")
    mode = metric_mode(metric, mode)
    recorded: dict[str, dict] = {}
    for path in sorted(out.glob("results.shard-*.json")):
        for r in read_json(path) or []:
            if isinstance(r, dict) and "name" in r:
                recorded[r["name"]] = r
    rows = []
    for r in plan["runs"]:
        run = SweepRun(r["name"], tuple(r["overrides"]))
        shard_row = recorded.get(run.name, {})
        error = shard_row.get("error") if shard_row.get("status") == "failed" else None
        rows.append(result_row(run, out, error))
    return write_results(out, rows, metric, mode)
