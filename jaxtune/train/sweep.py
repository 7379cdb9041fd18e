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
import itertools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxtune.atomic import atomic_file
from jaxtune.config import Config, load_config, validate_against_devices
from jaxtune.errors import ConfigError, JaxtuneError
from jaxtune.train.loop import train
from jaxtune.train.sweep_results import (
    DEFAULT_METRIC,
    PLAN,
    SweepRun,
    finished,
    metric_mode,
    read_json,
    result_row,
    write_results,
    yaml_value,
)

_UNSWEEPABLE = ("run.dir", "run.name")

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
        yaml_value(v, spec)  # a YAML error is a one-line ConfigError now
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
def persistent_compile_cache(cache_dir: str | Path):
    """Uses a persistent XLA compilation cache in ``cache_dir`` in this process while the
    context lasts, small CPU programs included (tests share it across their runs too)."""
    from jax.experimental.compilation_cache import compilation_cache as cc

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


@contextlib.contextmanager
def compilation_cache(cache_dir: Path):
    """:func:`persistent_compile_cache` for the sweep; left alone when the process already
    set a cache directory (the user's own wins)."""
    if jax.config.jax_compilation_cache_dir:
        yield
        return
    with persistent_compile_cache(cache_dir):
        yield


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, expected a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / PLAN).is_file():
        raise ConfigError(
            f"--out {out} is not empty and holds no sweep ({PLAN}); choose another directory"
        )


def _write_plan(out: Path, plan: dict) -> None:
    """``sweep.json``; runs already planned there (a sweep extended) are kept first."""
    old = read_json(out / PLAN) or {}
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
    mode = metric_mode(metric, mode)
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
