"""Orbax checkpoints of a training run: exact resume, keep-N / best, adapters-only.

A step directory holds four items:

- ``params``: the *trainable* partition only (LoRA / adapters for PEFT runs; every
  weight for full fine-tuning). Frozen base weights are re-read from ``model.path``.
- ``opt_state``: the optimizer state (trainable leaves only, by construction).
- ``data``: the data iterator position (epoch, step), so no batch is replayed or skipped.
- ``meta``: step, seed, metrics.

Arrays are stored under stable names derived from their pytree paths, and restored
straight into the shardings of the live state, so a run saved on 8 devices restores
on 1. Orbax finalises a step by an atomic rename: a save interrupted midway is never
seen as the latest step.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxtune.atomic import atomic_dir
from jaxtune.errors import ConfigError, DiskFullError, JaxtuneError, ModelLoadError
from jaxtune.hf.io import default_sharding
from jaxtune.models import (
    abstract_model,
    config_from_dict,
    config_to_dict,
    fill_model,
    resolve_dtype,
)
from jaxtune.quant import dequantize_model

_NO_SPACE = ("No space left on device", "os_error_code='28'", "Disk quota exceeded")


def _name(path) -> str:
    s = jax.tree_util.keystr(path)
    return re.sub(r"[^A-Za-z0-9_]+", ".", s).strip(".") or "root"


def to_named(tree) -> dict[str, jax.Array]:
    """Flattens a pytree to ``{stable name: leaf}``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {_name(p): x for p, x in leaves}
    if len(out) != len(leaves):
        raise ValueError("pytree paths collide after sanitising")
    return out


def from_named(named: dict, like):
    """Inverse of :func:`to_named` given a pytree ``like`` with the same structure."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [named[_name(p)] for p, _ in paths])


def abstract_named(tree) -> dict[str, jax.ShapeDtypeStruct]:
    """Restore targets (shape, dtype, sharding) for the live arrays of ``tree``."""
    return {
        k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        for k, x in to_named(tree).items()
    }


def _oserror_in(exc: BaseException | None, seen: set | None = None) -> OSError | None:
    """The first full-disk / permission OSError in ``exc``'s chain (Orbax wraps them:
    TensorStore reports ``ValueError: RESOURCE_EXHAUSTED ... No space left on device``)."""
    seen = set() if seen is None else seen
    if exc is None or id(exc) in seen:
        return None
    seen.add(id(exc))
    codes = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM)
    if isinstance(exc, OSError) and exc.errno in codes:
        return exc
    if any(s in str(exc) for s in _NO_SPACE):
        return OSError(errno.ENOSPC, "No space left on device")
    for sub in getattr(exc, "exceptions", None) or ():  # ExceptionGroup
        found = _oserror_in(sub, seen)
        if found is not None:
            return found
    context = None if exc.__suppress_context__ else exc.__context__
    return _oserror_in(exc.__cause__, seen) or _oserror_in(context, seen)


def os_error_message(exc: BaseException, where) -> Exception | None:
    """A one-line error for a full disk (DiskFullError) or a permission problem
    (ConfigError) anywhere in ``exc``'s chain while writing ``where``; else None."""
    found = None if isinstance(exc, JaxtuneError) else _oserror_in(exc)
    if found is None:
        return None
    target = getattr(found, "filename", None) or where
    if found.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left on device writing {target}")
    return ConfigError(f"cannot access {target} ({found.strerror or 'permission denied'})")


class _QuietFailedSaves(logging.Filter):
    """Drops Orbax's and asyncio's logs (with tracebacks) about a full disk or about a
    failed save's temporary directory: the save's caller raises one line instead.

    A failed save has echoes: Orbax logs it from each of its threads, writes still in
    flight in TensorStore's threads fail later (on the removed temporary directory) and
    asyncio logs "Task exception was never retrieved" for them. Other messages pass.
    """

    def __init__(self):
        super().__init__()
        self.silenced = list(_NO_SPACE)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return not any(s in text for s in self.silenced)


_QUIET = _QuietFailedSaves()


def _install_quiet() -> None:
    """Installs the filter above, and drops the "Event loop is closed" RuntimeErrors that
    TensorStore completions of a failed save raise (as unraisable exceptions) into
    Orbax's already-closed event loop."""
    for name in ("absl", "asyncio"):
        if _QUIET not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_QUIET)
    hook = sys.unraisablehook
    if getattr(hook, "_jaxtune", False):
        return

    def quiet(args):
        exc = args.exc_value
        if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
            return
        hook(args)

    quiet._jaxtune = True
    sys.unraisablehook = quiet


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for ``run_dir/checkpoints``.

    A save that fails on a full disk raises :class:`DiskFullError` (from ``save``,
    ``wait`` or ``close``, whichever sees it: saves may be asynchronous) after removing
    the temporary directory of that save; complete checkpoints are kept.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        keep: int = 3,
        keep_best: bool = False,
        best_metric: str = "eval/loss",
        best_mode: str = "min",
        async_save: bool = True,
    ):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        best_fn = None
        if keep_best:
            best_fn = lambda m: float(
                m.get(best_metric, float("inf") if best_mode == "min" else float("-inf"))
            )  # noqa: E731
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            best_fn=best_fn,
            best_mode=best_mode,
            keep_checkpoints_without_metrics=False if keep_best else True,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("params", "opt_state", "data", "meta"), options=options
        )
        self._saving: list[int] = []  # steps saved since the last completed wait
        self._closed = False
        _install_quiet()

    @contextlib.contextmanager
    def _writing(self):
        """Full disk / permission errors of Orbax -> one line; the failed save's temporary
        directory (only one this Checkpointer started) is removed."""
        try:
            yield
        except Exception as e:
            step = re.search(r"checkpoints/(\d+)\.orbax-checkpoint-tmp", str(e))
            steps = [int(step.group(1))] if step else list(self._saving)
            err = os_error_message(e, self.directory / str(steps[0]) if steps else self.directory)
            if err is None:
                raise
            steps = steps or list(self._saving)
            _QUIET.silenced += [f"{self.directory}/{s}.orbax-checkpoint-tmp" for s in steps]
            # Stop Orbax's threads before removing what they were writing.
            self._closed = True
            with contextlib.suppress(Exception):
                self.manager.close()
            self._remove_tmp(steps)
            raise err from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        params,
        opt_state,
        data_state: dict,
        meta: dict,
        metrics: dict | None = None,
    ):
        """Saves (asynchronously when enabled) everything needed to resume at ``step``.

        ``opt_state=None``: parameters without an optimizer (a head fitted on cached
        features); such a checkpoint loads for inference but cannot resume training.
        """
        items = dict(
            params=ocp.args.StandardSave(to_named(params)),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(to_named(opt_state))
        with self._writing():
            self._saving.append(int(step))
            self.manager.save(
                step, args=ocp.args.Composite(**items), metrics=metrics or None, force=True
            )

    def _remove_tmp(self, steps) -> None:
        """Removes the temporary directories of these (failed) saves, and again a moment
        later: writes still in flight in TensorStore's threads may land after the first
        removal."""
        for attempt in range(3):
            found = [
                tmp
                for step in set(steps)
                for tmp in self.directory.glob(f"{int(step)}.orbax-checkpoint-tmp*")
            ]
            for tmp in found:
                shutil.rmtree(tmp, ignore_errors=True)
            if attempt < 2:
                time.sleep(0.1)

    def restore(self, step: int, params_like, opt_state_like=None):
        """(params, opt_state or None, data_state, meta) restored into the live shardings."""
        items = {
            "params": ocp.args.StandardRestore(abstract_named(params_like)),
            "data": ocp.args.JsonRestore(),
            "meta": ocp.args.JsonRestore(),
        }
        if opt_state_like is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_named(opt_state_like))
        try:
            r = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many types for missing / mismatched items
            hint = ""
            if "tree structures do not match" in str(e) or "shape" in str(e).lower():
                hint = (
                    "; the trainable parameters differ from the checkpoint's: was peft.* or "
                    "the model changed since it was written? Use another run.dir or "
                    "train.overwrite=true"
                )
            raise ModelLoadError(
                f"{self.directory}/{step}: cannot restore checkpoint ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]}){hint}"
            ) from None
        params = from_named(r["params"], params_like)
        opt_state = (
            from_named(r["opt_state"], opt_state_like) if opt_state_like is not None else None
        )
        return params, opt_state, r["data"], r["meta"]

    def wait(self):
        with self._writing():
            self.manager.wait_until_finished()
        self._saving.clear()

    def close(self, *, quiet: bool = False):
        """Waits for pending saves and closes the manager (its threads and event loop).

        ``quiet``: on an error path, where the exception already propagating matters
        more than a save's, errors of the pending saves are swallowed.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        except Exception:
            if not quiet:
                raise
        finally:
            with contextlib.suppress(Exception):
                self.manager.close()


MARKER = "jaxtune.json"


def flat_params(model: nnx.Module, variable_type=nnx.Param) -> dict[str, jax.Array]:
    """``{"layers.attn.q_proj.kernel": array}`` of one variable type."""
    flat = nnx.to_flat_state(nnx.state(model, variable_type))
    return {".".join(str(p) for p in path): var[...] for path, var in flat}


def save_checkpoint(
    model: nnx.Module, out_dir: str | os.PathLike, *, tokenizer=None, overwrite: bool = False
) -> Path:
    """Writes ``jaxtune.json`` + Orbax params (+ tokenizer files), atomically.

    An existing non-empty ``out_dir`` is refused unless ``overwrite`` (which replaces an
    earlier jaxtune output only; see :func:`save_pretrained`). Quantized kernels are saved dequantized (the values the model computes with);
    ``from_pretrained(..., quantize=...)`` quantizes them again.
    """
    import orbax.checkpoint as ocp

    model = dequantize_model(model)

    out_dir = Path(out_dir).absolute()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        params = flat_params(model)
        dtype = str(next(iter(params.values())).dtype)
        _param_checkpointer().save(tmp / "params", args=ocp.args.PyTreeSave(params))
        meta = {
            "format": "jaxtune",
            "version": 1,
            "dtype": dtype,
            "model_config": config_to_dict(model.config),
        }
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def _param_checkpointer():
    """Orbax checkpointer for model weights: uncompressed (weights barely compress, and
    compression buffers cost ~0.5x the model in host memory) with bounded bytes in flight,
    so converting streams instead of doubling peak memory."""
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=1, save_device_host_concurrent_gb=1, use_compression=False
    )
    return ocp.Checkpointer(handler)


def load_checkpoint(path: Path, dtype=None, sharding=None, **opts) -> nnx.Module:
    """Loads a checkpoint written by :func:`save_checkpoint` straight into its shards."""
    import orbax.checkpoint as ocp

    try:
        meta = json.loads((path / MARKER).read_text())
        cfg = config_from_dict(meta["model_config"]).replace(**opts)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(
            f"{path / MARKER}: invalid jaxtune checkpoint metadata ({e})"
        ) from None
    dtype = dtype or resolve_dtype(meta.get("dtype", "float32"))
    abstract = abstract_model(cfg, dtype)
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    sharding = sharding or default_sharding
    target = {
        ".".join(str(p) for p in path_): jax.ShapeDtypeStruct(
            var.shape, var.dtype, sharding=sharding(path_, var)
        )
        for path_, var in flat
    }
    try:
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        restored = _param_checkpointer().restore(
            path / "params", args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
        )
    except Exception as e:  # orbax raises many types for truncated / mismatched data
        raise ModelLoadError(
            f"{path}: cannot restore params ({type(e).__name__}: {str(e)[:300]})"
        ) from None
    values = {path_: restored[".".join(str(p) for p in path_)] for path_, _ in flat}
    model = fill_model(abstract, values)
    return model
