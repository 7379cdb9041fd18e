"""Run directories: jaxtune owns what it writes, and nothing else.

A run directory created by jaxtune carries a marker file (:data:`MARKER`, a small JSON
object). The rules, decided before anything is written (:func:`plan_start`):

- A missing directory is created (with the marker) only once every check of the run
  has passed (:meth:`StartPlan.commit`), so a start that fails leaves no trace.
- ``train.overwrite=true`` empties only a jaxtune run directory (marked, or a run
  written before the marker existed: ``config.yaml`` + ``checkpoints/``), and only of
  the entries in :data:`OWNED`. A directory holding anything else is refused, naming
  the foreign entries; nothing outside ``run.dir`` is ever deleted.
- A non-empty directory that is not a jaxtune run is refused, whatever the flags.
- Resuming compares every saved setting of ``run_dir/config.yaml`` with the new config
  (:func:`check_resume`); only :data:`RESUMABLE` keys may change.

``jaxtune data inspect`` writes its default report into ``RUN_DIR/data_report`` through
:func:`output_dir`, so the directory it creates is a jaxtune run directory that a
later ``jaxtune train`` starts in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from jaxtune import __version__
from jaxtune.checkpoint import os_error_message
from jaxtune.config import config_to_dict
from jaxtune.errors import ConfigError, DiskFullError

MARKER = ".jaxtune-run"
MARKER_VERSION = 1

# Every entry jaxtune writes directly under a run directory: the one list that
# ``train.overwrite=true`` may delete. Keep it in sync with the writers (named here).
OWNED = frozenset(
    {
        "config.yaml",  # train/loop.py: the resolved config
        "metrics.jsonl",  # train/logger.py
        "loss_curve.png",  # train/logger.py
        "tensorboard",  # train/logger.py (logging.tensorboard)
        "wandb",  # train/logger.py: wandb.init(dir=run_dir)
        "wandb_id",  # train/logger.py
        "checkpoints",  # checkpoint.py (Orbax; its temporary dirs live inside)
        "summary.json",  # train/loop.py, train/classification.py
        "labels.json",  # train/classification.py
        "class_weights.json",  # train/classification.py (data.balance: weight)
        "classification_report.json",  # train/classification.py
        "classification_report.md",  # train/classification.py
        "eval",  # train/evals.py, retention.py, samples.py; `jaxtune eval CONFIG`'s --out
        "data_report",  # `jaxtune data inspect`'s default --out
        "export",  # scripts/quickstart.py (export/merged)
        "report.md",  # train/report.py (scripts/quickstart.py adds its section)
    }
)
# What jaxtune's other commands leave in a run.dir without a marker (an older `jaxtune
# data inspect`; `jaxtune eval CONFIG`, whose report goes to RUN_DIR/eval): a directory
# holding only these, recognised by their files, is adopted as a run directory.
_ADOPTABLE = {
    "data_report": lambda names: names <= {"report.json", "report.md", "lengths.png"},
    "eval": lambda names: bool(names & {"eval_report.json", "eval_meta.json"}),
}

# Settings that may differ between a run's saved config.yaml and the config that
# resumes it. Everything else changes what the checkpoint holds (shapes: peft.*,
# model.path, scan_layers, optimizer), which data the saved position points into
# (data.*, batch_size, grad_accum, seq_len, seed) or what the run computes (dtypes,
# quantization), so a change is refused. Why each one is safe:
RESUMABLE_PREFIXES = (
    "eval.",  # what is evaluated and how often: reads the weights, changes nothing
    "logging.",  # progress bar, TensorBoard, W&B: output only
    "mesh.",  # checkpoints restore into any mesh / device count (tested)
)
RESUMABLE = frozenset(
    {
        # Length of the run: extending a finished run is the common reason to resume.
        # The LR schedule spans the new total, as it would have from the start.
        "train.steps",
        "train.epochs",
        # Cadences and caps of the host loop: when to evaluate / log / stop.
        "train.eval_every",
        "train.log_every",
        "train.max_eval_batches",
        "train.early_stopping_patience",
        "train.resume",
        "train.overwrite",
        # The learning-rate curve and clipping: what a non-finite loss asks the user to
        # change before resuming from the last good checkpoint (no state depends on it).
        "optim.lr",
        "optim.schedule",
        "optim.warmup_steps",
        "optim.warmup_ratio",
        "optim.min_lr_ratio",
        "optim.grad_clip",
        # When to save and how many to keep (Orbax keeps the existing steps it can).
        "checkpoint.every",
        "checkpoint.keep",
        "checkpoint.async_save",
        # Execution options: same math, other memory / speed trade-off (resuming on
        # another machine).
        "model.remat",
        "model.attention",
        "model.mlp_chunks",
        "model.loss_chunk",
        "model.max_seq_len",
        "model.preset",
        # Where tokenized data is cached: the data itself is unchanged.
        "data.cache_dir",
        "run.dir",
        "run.name",
    }
)


@dataclass
class RunDirState:
    """What is in a run directory now (read-only snapshot)."""

    path: Path
    exists: bool
    marked: bool = False
    legacy: bool = False  # config.yaml + checkpoints/ written before the marker existed
    adoptable: bool = False  # empty, or only an old data inspect report
    entries: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    has_checkpoint: bool = False

    @property
    def owned(self) -> bool:
        return self.marked or self.legacy


def _is_owned_name(name: str) -> bool:
    if name in OWNED or name == MARKER:
        return True
    # Atomic writes go through hidden temporaries: ".config.yaml.tmp123".
    if name.startswith(".") and ".tmp" in name:
        return name[1:].split(".tmp")[0] in OWNED
    return False


def _first_few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def check_path(run_dir: Path) -> None:
    """ConfigError if ``run_dir`` (or a parent) is a file or cannot be written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir {run_dir} is a file, expected a directory")
    existing = run_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != run_dir and not existing.is_dir():
        raise ConfigError(f"run.dir {run_dir}: {existing} is a file, expected a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"run.dir {run_dir} is not writable ({existing}: permission denied or read-only)"
        )


def inspect(run_dir: str | Path) -> RunDirState:
    """A read-only look at ``run_dir``; ConfigError if it is a file or not writable."""
    run_dir = Path(run_dir)
    check_path(run_dir)
    if not run_dir.exists():
        return RunDirState(run_dir, exists=False)
    try:
        entries = sorted(p.name for p in run_dir.iterdir())
    except OSError as e:
        raise ConfigError(f"run.dir {run_dir}: cannot list it ({e.strerror})") from None
    st = RunDirState(run_dir, exists=True, entries=entries)
    st.marked = (run_dir / MARKER).is_file()
    st.legacy = (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints").is_dir()
    st.foreign = [n for n in entries if not _is_owned_name(n)]
    st.adoptable = all(
        n in _ADOPTABLE
        and (run_dir / n).is_dir()
        and _ADOPTABLE[n]({p.name for p in (run_dir / n).iterdir()})
        for n in entries
    )
    ckpts = run_dir / "checkpoints"
    st.has_checkpoint = ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
    return st


@dataclass
class StartPlan:
    """How ``jaxtune train`` will use the run directory; nothing written yet.

    ``mode``: ``fresh`` (start at step 0 in a new or reusable directory), ``resume``
    (continue from its checkpoints) or ``overwrite`` (delete the run's own entries,
    then start at step 0).
    """

    state: RunDirState
    mode: str

    @property
    def path(self) -> Path:
        return self.state.path

    @property
    def resume(self) -> bool:
        return self.mode == "resume"

    def commit(self, write_config) -> None:
        """Clears (overwrite), creates the directory + marker, then ``write_config(path)``.

        Call on one process only, after every check of the run has passed.
        """
        run_dir = self.path
        top = _top_missing(run_dir)
        try:
            if self.mode == "overwrite":
                for name in sorted(os.listdir(run_dir)):
                    if name != MARKER and _is_owned_name(name):
                        _remove(run_dir / name)
            run_dir.mkdir(parents=True, exist_ok=True)
            write_marker(run_dir)
            write_config(run_dir / "config.yaml")
        except Exception as e:
            if top is not None:  # leave no half-made run directory behind
                shutil.rmtree(top, ignore_errors=True)
            err = os_error_message(e, run_dir)  # DiskFullError for a full disk
            if isinstance(e, OSError) and not isinstance(err, DiskFullError):
                err = ConfigError(f"run.dir {run_dir} cannot be written ({e.strerror or e})")
            if err is None:
                raise
            raise err from None


def _top_missing(path: Path) -> Path | None:
    """The outermost missing directory on the way to ``path`` (None if it exists)."""
    if path.exists():
        return None
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def _remove(path: Path) -> None:
    """Deletes one owned entry; a symlink is removed itself, never followed."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def write_marker(run_dir: Path) -> None:
    """Writes the ownership marker unless it is there already."""
    path = Path(run_dir) / MARKER
    if path.is_file():
        return

    info = {"jaxtune_run": MARKER_VERSION, "created": time.time(), "jaxtune": __version__}
    path.write_text(json.dumps(info) + "\n")


def plan_start(cfg) -> StartPlan:
    """Decides fresh / resume / overwrite for ``cfg.run.dir``; refuses what is not ours.

    Raises:
      ConfigError: run.dir is a file or not writable; not empty and not a jaxtune run;
        overwrite asked for a run holding other files; a run with checkpoints and
        ``train.resume=false`` without ``train.overwrite``.
    """
    st = inspect(cfg.run.dir)
    where = f"run.dir {st.path}"
    if not st.exists:
        return StartPlan(st, "fresh")
    if not (st.owned or st.adoptable):
        raise ConfigError(
            f"{where} is not empty and is not a jaxtune run directory (it holds "
            f"{_first_few(st.entries)}); jaxtune never deletes or writes over files it did "
            "not create: choose another run.dir"
        )
    if cfg.train.overwrite:
        if st.foreign:
            raise ConfigError(
                f"{where} holds files jaxtune did not write ({_first_few(st.foreign)}); "
                "train.overwrite=true deletes only a run's own files: move them out or "
                "choose another run.dir"
            )
        return StartPlan(st, "overwrite" if st.entries else "fresh")
    if st.has_checkpoint:
        if cfg.train.resume:
            return StartPlan(st, "resume")
        advice = "" if st.foreign else " or pass train.overwrite=true to start over"
        raise ConfigError(
            f"{where} holds a run with checkpoints and train.resume is false; choose "
            f"another run.dir{advice}"
        )
    return StartPlan(st, "fresh")  # a run that died before its first checkpoint, or new


# -------------------------------------------------------------------- resume check


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not key == "data.fields":
            out.update(_flat(v, key + "."))
        else:
            out[key] = _norm(v)
    return out


def _norm(v):
    if isinstance(v, tuple | list):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def _show(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return str(v)


def resume_changes(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """``[(key, saved value, new value)]`` of settings a resume may not change.

    Keys present on one side only (a newer or older jaxtune) are not compared.
    """
    a, b = _flat(saved), _flat(new)
    out = []
    for key in a.keys() & b.keys():
        if key in RESUMABLE or key.startswith(RESUMABLE_PREFIXES):
            continue
        if a[key] != b[key]:
            out.append((key, a[key], b[key]))
    return sorted(out)


def check_resume(plan: StartPlan, cfg) -> None:
    """ConfigError naming each setting that differs from the run's saved config.yaml."""
    import yaml

    path = plan.path / "config.yaml"
    if not plan.resume or not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        why = " ".join(str(e).split())  # YAML errors span lines
        raise ConfigError(f"{path}: cannot read the run's saved config ({why})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections")
    changes = resume_changes(saved, config_to_dict(cfg))
    if not changes:
        return
    advice = "use another run.dir" + (
        "" if plan.state.foreign else ", or train.overwrite=true to start over"
    )
    if len(changes) == 1:
        key, old, new = changes[0]
        raise ConfigError(
            f"run.dir {plan.path} was trained with {key}={_show(old)}; this run asks for "
            f"{_show(new)}: {advice}"
        )
    listed = ", ".join(f"{k}={_show(o)} (this run: {_show(n)})" for k, o, n in changes)
    raise ConfigError(f"run.dir {plan.path} was trained with {listed}: {advice}")


# ------------------------------------------------------------------ writing errors


@contextlib.contextmanager
def writing(where: str | Path):
    """Turns a full disk / permission error while writing ``where`` into one line."""
    try:
        yield
    except Exception as e:
        err = os_error_message(e, where)
        if err is None:
            raise
        raise err from None


# ---------------------------------------------------------------- other commands


@contextlib.contextmanager
def output_dir(out: str | Path, run_dir: str | Path | None = None):
    """For a command writing the directory ``out`` (``data inspect``'s report).

    On failure, removes the directories this call created (nothing else). With
    ``run_dir`` (``out`` is inside it): refuses a run.dir that is a file, and marks a
    run.dir it created (or found empty) as a jaxtune run directory, so a later
    ``jaxtune train`` starts there.
    """
    out = Path(out)
    if run_dir is not None:
        run_dir = Path(run_dir)
        check_path(run_dir)
        mark = not run_dir.exists() or not any(run_dir.iterdir())
    top = _top_missing(out)
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{out} cannot be written ({e.strerror or e})") from None
        with writing(out):
            yield
            if run_dir is not None and mark:
                write_marker(run_dir)
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise
