"""Writing outputs so that a failure leaves nothing half-written and nothing foreign is lost.

:func:`atomic_file` writes a file through a temporary sibling renamed into place;
:func:`atomic_dir` does the same for a whole directory (exports, checkpoints), which it
marks with ``jaxtune_export.json`` listing what jaxtune wrote. An existing directory is
replaced only on request and only if jaxtune wrote it (:func:`check_out_dir`).
:func:`atomic_writer` streams a large file the same way; :func:`cache_entry` publishes a
content-keyed cache directory (tokenized data, features).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from jaxtune import __version__
from jaxtune.errors import DiskFullError, JaxtuneError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)

EXPORT_MARKER = "jaxtune_export.json"
# What jaxtune's exports hold besides tokenizer files (a directory of only these, whose
# config.json / adapter_config.json transformers / peft did not sign, is an export of a
# jaxtune from before the marker).
_EXPORT_FILES = (
    "config.json",
    "model.safetensors.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "jaxtune.json",
    "params",
)
_EXPORT_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
_OVERWRITE: contextvars.ContextVar[bool] = contextvars.ContextVar("overwrite", default=False)


class OutputError(JaxtuneError):
    """An output directory cannot be written (exists, not jaxtune's, no permission)."""


@contextlib.contextmanager
def overwriting(enabled: bool = True):
    """Within this context :func:`atomic_dir` calls without ``overwrite`` may replace an
    earlier jaxtune export (for writers that do not take an ``overwrite`` argument)."""
    token = _OVERWRITE.set(bool(enabled))
    try:
        yield
    finally:
        _OVERWRITE.reset(token)


def _foreign_entry(out_dir: Path) -> str | None:
    """None if jaxtune wrote ``out_dir`` (its marker lists every entry, or it is a
    marker-less export of an older jaxtune); else why it is not jaxtune's."""
    names = sorted(p.name for p in out_dir.iterdir())
    marker = out_dir / EXPORT_MARKER
    if marker.is_file():
        try:
            written = set(json.loads(marker.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return f"its {EXPORT_MARKER} is unreadable"
        extra = [n for n in names if n not in written and n != EXPORT_MARKER]
        return f"it holds {extra[0]!r}, which jaxtune did not write there" if extra else None
    known = (*_EXPORT_FILES, *TOKENIZER_FILES)
    extra = [n for n in names if n not in known and not _EXPORT_RE.match(n)]
    if extra:
        return f"it holds {extra[0]!r}, which no jaxtune export writes"

    def signed(name: str, key: str) -> bool:
        try:
            return key in json.loads((out_dir / name).read_text())
        except (OSError, ValueError):
            return True  # unreadable: not recognisably jaxtune's

    if (out_dir / "jaxtune.json").is_file():
        return None  # a jaxtune checkpoint (``jaxtune convert``)
    if (out_dir / "config.json").is_file() and not signed("config.json", "transformers_version"):
        return None
    if (out_dir / "adapter_config.json").is_file() and not signed(
        "adapter_config.json", "peft_version"
    ):
        return None
    return f"it has no {EXPORT_MARKER} (not a jaxtune export)"


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool | None = None) -> Path:
    """Raises :class:`OutputError` unless ``out_dir`` may be written by an export.

    A missing or empty directory may; an existing non-empty one only with ``overwrite``
    and only if jaxtune wrote it (never a directory holding anything else).
    """
    out_dir = Path(out_dir)
    overwrite = _OVERWRITE.get() if overwrite is None else overwrite
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory; choose another output path")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return out_dir
    if not overwrite:
        raise OutputError(
            f"{out_dir}: already exists and is not empty; pass --overwrite (Python: "
            "overwrite=True) to replace an earlier jaxtune export, or choose another directory"
        )
    why = _foreign_entry(out_dir)
    if why is not None:
        raise OutputError(
            f"{out_dir}: not replaced: {why}; jaxtune only replaces its own exports, even "
            "with --overwrite (move it away or choose another directory)"
        )
    return out_dir


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_modes(root: Path) -> None:
    """Directory 0o777 and files 0o666 (minus the umask), as if made with mkdir/open:
    ``tempfile.mkdtemp`` makes the directory 0o700."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            path = os.path.join(dirpath, f)
            mode = os.stat(path).st_mode & 0o111  # keep execute bits
            os.chmod(path, (0o666 | mode) & ~mask)


def _write_marker(tmp: Path) -> None:
    files = sorted(p.name for p in tmp.iterdir() if p.name != EXPORT_MARKER)
    marker = {"written_by": "jaxtune", "version": __version__, "files": files}
    (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, overwrite: bool | None = None):
    """Context manager: write into a temp sibling dir, rename it into place on success.

    On an exception nothing changes at ``out_dir`` (the temporary directory is removed).
    ``out_dir`` may exist only as an empty directory, or (``overwrite``) as an earlier
    jaxtune export, which is replaced as a whole (see :func:`check_out_dir`; None: the
    :func:`overwriting` context's setting, off by default). The result has normal
    permissions and carries ``jaxtune_export.json`` listing what it holds.

    Raises:
      OutputError: ``out_dir`` may not be written or cannot be created.
      DiskFullError: the disk filled up (nothing is left behind).
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot create ({e.strerror or e})") from None
    try:
        yield tmp
        _write_marker(tmp)
        _normal_modes(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left on device writing {out_dir}") from None
        raise
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike):
    """Context manager yielding a binary file whose content replaces ``path`` on success.

    Readers see the old content or the new one, never a partial file; on an exception the
    temporary sibling is removed and ``path`` is unchanged (for streaming large writes;
    :func:`atomic_file` writes a string or bytes at once).

    Raises:
      DiskFullError: the disk filled up (nothing is left behind).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left on device writing {path}") from None
        raise


def atomic_file(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes ``data`` to ``path`` through a temporary sibling renamed into place.

    Readers see the old content or the new one, never a partial file; on an error the
    temporary file is removed and ``path`` is unchanged. Text is written as UTF-8.
    """
    with atomic_writer(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


@contextlib.contextmanager
def cache_entry(final: str | os.PathLike, *, replace: bool = False):
    """Context manager: build a cache entry in a temp sibling dir, rename it to ``final``.

    Cache entries are keyed by their content's inputs, so when ``final`` already exists
    (another process built it meanwhile) that entry is kept and ours dropped, unless
    ``replace`` (a rebuild, or a damaged entry being recomputed). On an exception the
    temporary directory is removed and ``final`` is unchanged.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if replace and final.exists():
            shutil.rmtree(final)
        if final.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left on device writing {final}") from None
        raise
