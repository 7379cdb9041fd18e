"""Hyper-parameter sweeps: many ordinary runs of one config, one after another.

``jaxtune sweep CONFIG --grid KEY=V1,V2 [--grid ...]`` (or :func:`sweep`) trains the
product of the grids, or ``--random N`` seeded draws from them, each as an ordinary run
directory ``OUT/<name>/`` (``name`` is readable: ``max_examples=100,lr=1e-4``), and
writes a table of the results.

- **Grid values** are YAML scalars or flow lists, split on the commas outside brackets:
  ``--grid optim.lr=1e-4,5e-4 --grid peft.targets=[q_proj,v_proj],all-linear``. With
  ``--random N`` a key may also take a range ``KEY=LO:HI`` (positive numbers): each draw
  is log-uniform in it (integers when both ends are integers). Random draws use
  ``--seed``; a draw equal to an earlier one is dropped, so fewer than N runs can result.
- **Checked first.** Every run's config is built (``load_config`` with the run's
  overrides) before the first run starts, so an unknown key or a bad value in a grid is
  one ``ConfigError`` and nothing is trained.
- **Resume.** A run whose ``summary.json`` says it completed (or stopped early) is
  skipped; any other run is started, and one with checkpoints resumes from the latest
  (:func:`jaxtune.train.loop.train`). So a killed sweep, run again, finishes the run it
  was in and skips the finished ones. A run that fails with a :class:`JaxtuneError`
  (e.g. a non-finite loss at a high learning rate) is recorded as ``failed`` and the
  sweep goes on; it is tried again by the next invocation. A run stopped by SIGTERM /
  SIGINT stops the sweep.
- **Shared work.** Every run's ``data.cache_dir`` is ``OUT/cache`` unless the config sets
  one, and the tokenized-data cache is keyed by content, so runs with the same data
  config tokenize once. JAX's persistent compilation cache is on in ``OUT/jax_cache``
  (unless the process set another), so runs with the same shapes reuse the compiled step.
- **Data-size sweeps nest:** ``data.max_examples`` keeps the first N of one permutation
  seeded by ``data.split_seed``, so the 100-example run's data is inside the 300's.
  It caps every split; ``data.train_fraction`` takes the same nested prefix of the
  train split only, so every size is evaluated on the same validation examples.
- **Several machines:** ``--shard I/N`` (0-based, ``0 <= I < N``) runs runs ``I, I+N,
  I+2N, ...`` of the list and writes ``OUT/results.shard-I-of-N.json``; put the shards'
  ``OUT`` directories together (or share one) and ``jaxtune sweep --collect OUT``
  rebuilds ``results.json`` / ``results.md`` / the plots from the run directories.

Outputs in ``OUT``: ``sweep.json`` (the plan), ``results.json`` (a list, one object per
run: ``name``, ``overrides``, ``status``, ``steps``, ``final_train_loss``,
``best_eval_loss``, ``final_eval_loss``, every other final ``eval/...`` / ``tasks/...``
metric of the run, ``trainable_params``, ``wall_time_s``, ``tokens_per_sec``),
``results.md`` (the same table, the best run by ``metric`` marked),
``metric_vs_<key>.png`` (the metric against each numeric swept key; log x for learning
rates and keys spanning more than a decade) and ``validation_curves.png`` (every run's
validation loss against step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxtune.atomic import atomic_file
from jaxtune.config import Config, load_config, validate_against_devices
from jaxtune.config_yaml import parse_yaml
from jaxtune.errors import ConfigError, JaxtuneError
from jaxtune.train.loop import train

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
)
_UNSWEEPABLE = ("run.dir", "run.name")
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
            out[key] = _yaml(text, o)
        return out


# ----------------------------------------------------------------- the run list


def _split_values(text: str) -> list[str]:
    """``a,[b,c],d`` -> ``["a", "[b,c]", "d"]``: commas inside brackets stay."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def _yaml(text: str, where: str) -> Any:
    return parse_yaml(text, f"--grid {where!r}")[0] if text.strip() else None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_grid(spec: str) -> tuple[str, list[str] | tuple[float, float]]:
    """``KEY=V1,V2,...`` -> ``(KEY, [V1, V2, ...])``; ``KEY=LO:HI`` -> ``(KEY, (LO, HI))``.

    Raises:
      ConfigError: no ``=``, a key that is not ``section.key``, an empty value, a range
        whose ends are not positive numbers with LO < HI, or a key that cannot be swept.
    """
    key, sep, text = spec.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or len(parts) < 2 or not all(parts) or not text.strip():
        raise ConfigError(
            f"--grid {spec!r}: expected section.key=V1,V2,... (e.g. optim.lr=1e-4,5e-4) "
            "or section.key=LO:HI for --random"
        )
    if key in _UNSWEEPABLE:
        raise ConfigError(f"--grid {spec!r}: {key} is set by the sweep (OUT/<run name>)")
    lo_hi = text.split(":")
    if len(lo_hi) == 2 and "," not in text and "[" not in text:
        lo, hi = _number(lo_hi[0]), _number(lo_hi[1])
        if lo is None or hi is None or not 0 < lo < hi:
            raise ConfigError(f"--grid {spec!r}: a range LO:HI needs positive numbers with LO < HI")
        ints = all(re.fullmatch(r"\s*\d+\s*", x) for x in lo_hi)
        return key, (int(lo), int(hi)) if ints else (lo, hi)
    values = _split_values(text)
    if any(not v for v in values):
        raise ConfigError(f"--grid {spec!r}: empty value in the list")
    for v in values:
        _yaml(v, spec)  # a YAML error is a one-line ConfigError now
    return key, list(dict.fromkeys(values))


def _draw(rng: np.random.Generator, values) -> str:
    if isinstance(values, list):
        return values[int(rng.integers(len(values)))]
    lo, hi = values
    x = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if isinstance(lo, int) and isinstance(hi, int):
        return str(min(hi, max(lo, round(x))))
    return f"{x:.3g}"


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each key's last part where that is unique among the swept keys, else the key."""
    last = [k.rpartition(".")[2] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def run_name(overrides: tuple[str, ...], short: dict[str, str] | None = None) -> str:
    """A readable, filesystem-safe directory name: ``max_examples=100,lr=1e-4``."""
    parts = []
    for o in overrides:
        key, _, text = o.partition("=")
        parts.append(f"{(short or {}).get(key, key)}={text}")
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts)).strip(".") or "run"
    if len(name) > 120:  # keep it a valid file name
        name = f"{name[:100]}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"
    return name


def expand(
    grids: list[str] | dict[str, Any], random: int | None = None, seed: int = 0
) -> list[SweepRun]:
    """The runs of a sweep: the product of the grids, or ``random`` seeded draws.

    Args:
      grids: ``["KEY=V1,V2", ...]`` (the ``--grid`` arguments, in order), or a mapping
        ``{KEY: [V1, V2]}`` / ``{KEY: (LO, HI)}``.
      random: draw this many runs instead of the product (duplicates dropped).
      seed: the seed of the draws.

    Raises:
      ConfigError: a malformed grid, a key given twice, a range without ``random``, or
        nothing to sweep.
    """
    if isinstance(grids, dict):
        specs = []
        for k, v in grids.items():
            if isinstance(v, tuple):
                specs.append(f"{k}={v[0]}:{v[1]}")
            else:
                specs.append(f"{k}=" + ",".join(_flow(x) for x in v))
        grids = specs
    parsed: dict[str, Any] = {}
    for spec in grids:
        key, values = parse_grid(spec)
        if key in parsed:
            raise ConfigError(f"--grid {spec!r}: {key} is swept twice; give its values once")
        parsed[key] = values
    if not parsed:
        raise ConfigError("nothing to sweep: give at least one --grid KEY=V1,V2,...")
    if random is not None and random < 1:
        raise ConfigError(f"--random {random}: expected a positive number of runs")
    keys = list(parsed)
    if random is None:
        ranges = [k for k in keys if isinstance(parsed[k], tuple)]
        if ranges:
            raise ConfigError(
                f"--grid {ranges[0]}=LO:HI: a range needs --random N (a grid lists values)"
            )
        combos = list(itertools.product(*(parsed[k] for k in keys)))
    else:
        rng = np.random.default_rng(seed)
        combos = [tuple(_draw(rng, parsed[k]) for k in keys) for _ in range(random)]
        combos = list(dict.fromkeys(combos))
    short = _short_keys(keys)
    runs, seen = [], {}
    for combo in combos:
        overrides = tuple(f"{k}={v}" for k, v in zip(keys, combo, strict=True))
        name = run_name(overrides, short)
        if name in seen:  # two values that read the same once made file-safe
            seen[name] += 1
            name = f"{name}-{seen[name]}"
        seen.setdefault(name, 1)
        runs.append(SweepRun(name, overrides))
    return runs


def _flow(x: Any) -> str:
    if isinstance(x, list | tuple):
        return "[" + ",".join(_flow(v) for v in x) + "]"
    if x is None or isinstance(x, bool):
        return {None: "null", True: "true", False: "false"}[x]
    return str(x)


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"I/N"`` (0-based, ``0 <= I < N``) -> ``(I, N)``; ConfigError otherwise."""
    if spec is None or isinstance(spec, tuple):
        i, n = spec if spec is not None else (0, 1)
        if spec is not None and not 0 <= i < n:
            raise ConfigError(f"--shard {i}/{n}: expected I/N with 0 <= I < N (0-based)")
        return spec
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError(
            f"--shard {spec}: expected I/N with 0 <= I < N (0-based; e.g. --shard 0/2 and "
            "--shard 1/2 split a sweep over two machines)"
        )
    return int(m.group(1)), int(m.group(2))


# ------------------------------------------------------------------ the sweep


def run_configs(
    config: str | Path,
    runs: list[SweepRun],
    out: Path,
    overrides: tuple[str, ...] | list[str] = (),
) -> list[Config]:
    """Every run's validated config (run.dir = ``out/<name>``, data.cache_dir =
    ``out/cache`` unless the config sets one). Raises ConfigError on the first bad one
    (a key, a value, or a mesh / batch size that does not fit this host's devices)."""
    cfgs = []
    for r in runs:
        cfg = load_config(config, [*overrides, *r.overrides])
        validate_against_devices(cfg, jax.device_count(), jax.process_count())
        data = cfg.data
        if data.cache_dir is None:
            data = dataclasses.replace(data, cache_dir=str(out / "cache"))
        run = dataclasses.replace(cfg.run, dir=str(out / r.name))
        cfgs.append(dataclasses.replace(cfg, data=data, run=run))
    return cfgs


@contextlib.contextmanager
def compilation_cache(cache_dir: Path):
    """JAX's persistent compilation cache in ``cache_dir`` for the sweep, small CPU
    programs included; left alone when the process already set a cache directory."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    if jax.config.jax_compilation_cache_dir:
        yield
        return
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update(names[0], str(cache_dir))
    jax.config.update(names[1], 0.0)
    jax.config.update(names[2], -1)
    cc.reset_cache()  # the cache decides once whether it is on: make it look again
    try:
        yield
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        cc.reset_cache()


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, expected a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / PLAN).is_file():
        raise ConfigError(
            f"--out {out} is not empty and holds no sweep ({PLAN}); choose another directory"
        )


def _write_plan(out: Path, plan: dict) -> None:
    """``sweep.json``; runs already planned there (a sweep extended) are kept first."""
    old = _read_json(out / PLAN) or {}
    runs = {r["name"]: r for r in old.get("runs", [])}
    runs.update({r["name"]: r for r in plan["runs"]})
    atomic_file(out / PLAN, json.dumps({**plan, "runs": list(runs.values())}, indent=1))


def sweep(
    config: str | Path,
    grids: list[str] | dict[str, Any],
    *,
    out: str | Path,
    overrides: tuple[str, ...] | list[str] = (),
    random: int | None = None,
    seed: int = 0,
    metric: str = DEFAULT_METRIC,
    mode: str | None = None,
    shard: str | tuple[int, int] | None = None,
) -> dict:
    """Runs a sweep (or one shard of it), resuming what an earlier invocation left.

    Args:
      config: the YAML run config every run starts from.
      grids: ``["optim.lr=1e-4,5e-4", ...]`` or ``{"optim.lr": [1e-4, 5e-4]}``; see
        :func:`expand` (ranges ``KEY=LO:HI`` with ``random``).
      out: the sweep directory (runs in ``out/<name>``).
      overrides: dotted ``key=value`` overrides applied to every run.
      random: draw this many runs from the grids instead of their product.
      seed: the seed of the random draws.
      metric: the results column that picks the best run (default ``final_eval_loss``;
        any ``eval/...`` or ``tasks/...`` metric of the runs).
      mode: ``min`` or ``max``; default from the metric's name (losses, perplexity
        and errors: min; anything else, e.g. accuracy: max).
      shard: ``"I/N"`` or ``(I, N)``: run only runs ``I, I+N, ...`` (0-based).

    Returns:
      ``{"rows", "best", "files"}`` (see :func:`write_results`); with a shard, the
      rows of that shard and ``files`` holding its ``results.shard-I-of-N.json``.

    Raises:
      ConfigError: a malformed grid or shard, a run config that does not validate, or
        an ``out`` that is not a sweep directory; nothing is trained then.
    """
    out = Path(out)
    shard_t = parse_shard(shard)
    mode = _mode(metric, mode)
    runs = expand(grids, random, seed)
    cfgs = run_configs(config, runs, out, overrides)
    _check_out(out)
    plan = {
        "config": str(Path(config).absolute()),
        "overrides": list(overrides),
        "grids": list(grids) if not isinstance(grids, dict) else grids,
        "random": random,
        "seed": seed,
        "metric": metric,
        "mode": mode,
        "runs": [{"name": r.name, "overrides": list(r.overrides)} for r in runs],
    }
    mine = list(range(len(runs)))
    if shard_t is not None:
        mine = mine[shard_t[0] :: shard_t[1]]
    out.mkdir(parents=True, exist_ok=True)
    _write_plan(out, plan)
    failed: dict[str, str] = {}
    stopped = False

    def rows() -> list[dict]:
        return [result_row(runs[i], out, failed.get(runs[i].name)) for i in mine]

    def write() -> dict:
        if shard_t is None:
            return write_results(out, rows(), metric, mode)
        path = out / f"results.shard-{shard_t[0]}-of-{shard_t[1]}.json"
        r = rows()
        atomic_file(path, json.dumps(r, indent=1, default=str))
        return {"rows": r, "best": None, "files": [path]}

    with compilation_cache(out / "jax_cache"):
        for k, i in enumerate(mine):
            r, cfg = runs[i], cfgs[i]
            head = f"[sweep {k + 1}/{len(mine)}] {r.name}"
            if finished(out / r.name):
                print(f"{head}: finished earlier, skipped", file=sys.stderr)
                continue
            print(f"{head}: training in {out / r.name}", file=sys.stderr)
            try:
                summary = train(cfg)
            except JaxtuneError as e:
                failed[r.name] = str(e)
                print(f"{head}: failed: {e}", file=sys.stderr)
                write()
                continue
            write()
            if str(summary.get("stop_reason", "")).startswith("stopped by"):
                stopped = True  # SIGTERM / SIGINT: the user wants the sweep to stop
                print(f"{head}: {summary['stop_reason']}; sweep stopped", file=sys.stderr)
                break
    result = write()
    if not stopped and shard_t is None and result["best"] is not None:
        print(f"best run by {metric}: {result['best']}", file=sys.stderr)
    return result


# ------------------------------------------------------------------ results


def _read_json(path: Path):
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
    summary = _read_json(run_dir / "summary.json")
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
    summary = _read_json(run_dir / "summary.json")
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
        for k, v in sorted((summary.get("eval") or {}).items()):
            if k != "eval/loss" and _num(v) is not None:
                row[k] = v
    params = (summary or {}).get("params") or {}
    row["trainable_params"] = params.get("trainable")
    row["wall_time_s"] = (summary or {}).get("seconds")
    row["tokens_per_sec"] = statistics.median(speeds) if speeds else None
    return row


def _mode(metric: str, mode: str | None) -> str:
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
    plan = _read_json(out / PLAN)
    if not isinstance(plan, dict) or "runs" not in plan:
        raise ConfigError(f"--collect {out}: no sweep there ({out / PLAN} is missing)")
    if metric is None:
        metric = plan.get("metric") or DEFAULT_METRIC
        mode = mode or plan.get("mode")
    mode = _mode(metric, mode)
    recorded: dict[str, dict] = {}
    for path in sorted(out.glob("results.shard-*.json")):
        for r in _read_json(path) or []:
            if isinstance(r, dict) and "name" in r:
                recorded[r["name"]] = r
    rows = []
    for r in plan["runs"]:
        run = SweepRun(r["name"], tuple(r["overrides"]))
        shard_row = recorded.get(run.name, {})
        error = shard_row.get("error") if shard_row.get("status") == "failed" else None
        rows.append(result_row(run, out, error))
    return write_results(out, rows, metric, mode)
