"""Reading raw rows from data files (split assignment lives in ``splits.py``).

Every supported source is read as a stream of :class:`Record` objects, one row at a time,
so a large file is never held whole in a Python list:

* JSONL (``.jsonl``, ``.ndjson``; also ``.json`` files that hold one object per line) is
  read line by line from bytes, so a malformed line or non-UTF-8 bytes are reported with
  the file and line number.
* JSON arrays (``.json``) are parsed whole (the standard library has no streaming parser);
  use JSONL for large data.
* CSV / TSV rows are decoded line by line (line numbers in errors) and parsed with ``csv``.
* Parquet is read in record batches through pyarrow.
* Plain text (``.txt``, ``.md``) yields paragraph-aligned blocks of about 64 KiB; a file
  is one document (the ``text`` format joins documents with EOS).
* A saved ``datasets`` directory (``save_to_disk``) is memory-mapped by Arrow and read in
  slices of 1,024 rows.

Any of these may be gzip-compressed (``.gz``). A path may also be a glob or a plain
directory of such files.
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxtune.errors import DataError
from jaxtune.resources import resolve_path

TEXT_BLOCK_CHARS = 1 << 16
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}


class RowError(DataError):
    """A single bad row; ``reason`` is a short category used to count skipped rows."""

    def __init__(self, source: str, reason: str, detail: str):
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.reason = reason


@dataclass
class Record:
    """One raw row.

    Attributes:
      source: where it came from, ``file:line`` or ``dir[row]``; used in error messages.
      index: position in its whole source (all files of a glob); drives the split.
      row: the parsed row, or None when it could not be parsed (see ``error``).
      error: why the row could not be parsed.
    """

    source: str
    index: int
    row: dict[str, Any] | None
    error: RowError | None = None


def _one_line(text: Any, limit: int = 80) -> str:
    """A short single-line rendering of a value for error messages."""
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flat(err: Exception) -> str:
    """An exception's message on one line (errors are printed as one line)."""
    return " ".join(str(err).split()) or type(err).__name__


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def file_kind(path: Path) -> str:
    """The reader for a path: jsonl, json, csv, tsv, parquet, text or arrow (saved dir)."""
    if _is_saved_dataset(path):
        return "arrow"
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    kind = _SUFFIXES.get(Path(name).suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unsupported data file type; expected .jsonl, .json, .csv, .tsv, .parquet, "
            ".txt (optionally .gz) or a directory written by datasets' save_to_disk"
        )
    return kind


def resolve_paths(spec: str, what: str = "data file") -> list[Path]:
    """Expands a file, glob, saved-dataset directory or directory of files into paths.

    Args:
      spec: the configured path.
      what: the config key, named in the error when nothing matches.

    Returns:
      Sorted list of paths (a saved dataset directory is returned as one path).
    """

    spec = str(resolve_path(spec))  # pkg:NAME/... -> a path inside an installed package
    path = Path(os.path.expanduser(spec))
    if any(ch in spec for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(os.path.expanduser(spec), recursive=True))]
        paths = [p for p in paths if p.is_file() or _is_saved_dataset(p)]
    elif _is_saved_dataset(path) or path.is_file():
        paths = [path]
    elif path.is_dir():
        paths = sorted(
            p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and _known(p)
        )
    else:
        raise DataError(f"{spec}: {what} not found; expected a file, a glob or a directory")
    if not paths:
        raise DataError(f"{spec}: {what} matches no files")
    for p in paths:
        file_kind(p)  # fail early on unsupported types
    return paths


def _known(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix.lower() in _SUFFIXES


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, source: str) -> str:
    try:
        # A byte-order mark (Windows editors) is not part of the content.
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise RowError(
            source,
            "not UTF-8",
            f"bytes {raw[e.start : e.start + 4]!r} at column {e.start + 1} are not valid "
            "UTF-8; expected UTF-8 text",
        ) from None


def _iter_jsonl(path: Path, base: int) -> Iterator[Record]:
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            source = f"{path}:{lineno}"
            index = base + lineno - 1
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                obj = json.loads(_decode(raw, source))
            except RowError as e:
                yield Record(source, index, None, e)
                continue
            except json.JSONDecodeError as e:
                err = RowError(
                    source,
                    "malformed JSON",
                    f"malformed JSON ({e.msg} at column {e.colno}); expected one JSON object "
                    "per line",
                )
                yield Record(source, index, None, err)
                continue
            if not isinstance(obj, dict):
                err = RowError(
                    source, "not an object", f"expected a JSON object, got {type(obj).__name__}"
                )
                yield Record(source, index, None, err)
                continue
            yield Record(source, index, obj)


def _looks_like_json_array(path: Path) -> bool:
    with _open_binary(path) as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[") or head.startswith(b"\xef\xbb\xbf[")


def _iter_json(path: Path, base: int) -> Iterator[Record]:
    if not _looks_like_json_array(path):
        # Many ".json" files are really JSONL (one object per line).
        yield from _iter_jsonl(path, base)
        return
    with _open_binary(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: bytes are not valid UTF-8; expected UTF-8 text") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); expected a JSON "
            "array of objects"
        ) from None
    for i, obj in enumerate(rows):
        source = f"{path}[{i}]"
        if not isinstance(obj, dict):
            err = RowError(
                source, "not an object", f"expected a JSON object, got {type(obj).__name__}"
            )
            yield Record(source, base + i, None, err)
        else:
            yield Record(source, base + i, obj)


def _decoded_lines(path: Path, f, state: dict) -> Iterator[str]:
    """Decodes a binary file line by line, so a decode error can name its line.

    A line that is not UTF-8 is passed on with replacement characters (so the csv reader
    keeps going) and its error is left in ``state["error"]`` for the record it belongs to.
    """
    for lineno, raw in enumerate(f, start=1):
        state["line"] = lineno
        try:
            yield _decode(raw, f"{path}:{lineno}")
        except RowError as e:
            state.setdefault("error", e)
            yield raw.decode("utf-8", errors="replace")


def _iter_csv(path: Path, base: int, delimiter: str) -> Iterator[Record]:
    state: dict[str, Any] = {"line": 0}
    with _open_binary(path) as f:
        reader = csv.reader(_decoded_lines(path, f, state), delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:{state['line']}: malformed CSV header ({e})") from None
        if "error" in state:
            raise state["error"]
        i = 0
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{path}:{state['line']}: malformed CSV ({e})") from None
            source = f"{path}:{state['line']}"
            if not values:
                continue
            if "error" in state:
                yield Record(source, base + i, None, state.pop("error"))
            elif len(values) != len(header):
                err = RowError(
                    source,
                    "wrong column count",
                    f"has {len(values)} columns; expected {len(header)} like the header",
                )
                yield Record(source, base + i, None, err)
            else:
                yield Record(source, base + i, dict(zip(header, values, strict=True)))
            i += 1


def _iter_parquet(path: Path, base: int) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read Parquet file ({_flat(e)})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield Record(f"{path}[{i}]", base + i, row)
            i += 1


def _iter_text(path: Path, base: int) -> Iterator[Record]:
    """Yields ~64 KiB blocks of one document, cut at blank lines when possible."""
    block: list[str] = []
    size = 0
    i = 0
    start_line = 1
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, f"{path}:{lineno}")
            block.append(line)
            size += len(line)
            # Cutting at a paragraph break keeps chunk-boundary tokenization close to
            # what tokenizing the whole document would give.
            if size >= TEXT_BLOCK_CHARS and (not line.strip() or size >= 4 * TEXT_BLOCK_CHARS):
                row = {"text": "".join(block), "_last": False}
                yield Record(f"{path}:{start_line}", base + i, row)
                block, size, start_line, i = [], 0, lineno + 1, i + 1
    if block:
        yield Record(f"{path}:{start_line}", base + i, {"text": "".join(block), "_last": True})
    elif i:
        # The document ended exactly at a block boundary: mark the end with an empty block.
        yield Record(f"{path}:{start_line}", base + i, {"text": "", "_last": True})


def open_saved_dataset(path: Path, split: str | None):
    """Memory-maps a ``save_to_disk`` directory; picks ``split`` from a DatasetDict."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError/ValueError/... for bad dirs
        raise DataError(f"{path}: cannot load saved dataset ({_flat(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{path}: saved DatasetDict has no split {split!r}; expected one of "
                f"{sorted(ds)} (set data.split)"
            )
        ds = ds[split]
    return ds


def _iter_arrow(path: Path, base: int, split: str | None) -> Iterator[Record]:
    ds = open_saved_dataset(path, split)
    for start in range(0, len(ds), 1024):
        chunk = ds[start : start + 1024]
        names = list(chunk)
        for j in range(len(chunk[names[0]]) if names else 0):
            yield Record(f"{path}[{start + j}]", base + start + j, {n: chunk[n][j] for n in names})


def iter_file(path: Path, base: int = 0, split: str | None = None) -> Iterator[Record]:
    """Streams the records of one file (or saved dataset directory).

    Args:
      path: a file or saved ``datasets`` directory.
      base: index of its first record within the whole source.
      split: DatasetDict split name for saved dataset directories.
    """
    kind = file_kind(path)
    if kind == "jsonl":
        return _iter_jsonl(path, base)
    if kind == "json":
        return _iter_json(path, base)
    if kind in ("csv", "tsv"):
        return _iter_csv(path, base, "," if kind == "csv" else "\t")
    if kind == "parquet":
        return _iter_parquet(path, base)
    if kind == "text":
        return _iter_text(path, base)
    return _iter_arrow(path, base, split)


def count_records(path: Path, split: str | None = None) -> int:
    """Upper bound on the record indices of a file (cheap for JSONL, Parquet and Arrow)."""
    kind = file_kind(path)
    if kind == "arrow":
        return len(open_saved_dataset(path, split))
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if kind == "jsonl" or (kind == "json" and not _looks_like_json_array(path)):
        # Record indices of JSONL are line numbers - 1, blank lines included.
        n, last = 0, b"\n"
        with _open_binary(path) as f:
            while chunk := f.read(1 << 20):
                n += chunk.count(b"\n")
                last = chunk[-1:]
        return n + (last != b"\n")
    n = 0
    for rec in iter_file(path, 0, split):
        n = rec.index + 1
    return n


def check_not_empty(path: Path, kind: str) -> None:
    if kind == "arrow" or not path.is_file():
        return
    with _open_binary(path) as f:
        head = f.read(1 << 16)
    if not head.strip():
        raise DataError(f"{path}: file is empty; expected at least one row")


def get_field(row: dict[str, Any], column: str) -> Any:
    """Looks up a column, following dots into nested objects (``doc.question``)."""
    if column in row:
        return row[column]
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(column)
        value = value[part]
    return value
