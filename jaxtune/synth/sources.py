"""Raw text inputs -> documents with stable ids, for ``jaxtune data generate``.

Each ``--input`` is a file, a glob, a directory or a saved ``datasets`` directory
(``pkg:`` paths resolve as in configs; :func:`jaxtune.data.loaders.resolve_paths`).

* ``.txt`` (optionally ``.gz``): one document per file, id ``PATH``; with
  ``chunk_chars`` the file is cut into chunks of at most that many characters at
  paragraph breaks, else at sentence ends, else at spaces, ids ``PATH#chunkN``
  (N from 0).
* row files (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``, saved datasets):
  one document per row, its text in ``text_field`` (dots reach into objects), id
  ``PATH:LINE`` (``DIR[ROW]`` for saved datasets) or the row's ``id_field``. A long row
  is chunked like a text file when ``chunk_chars`` is set.

``PATH`` is the input as given when it names one file (so a ``pkg:`` input keeps its
portable name), else the matched file. Ids must be unique: resuming skips documents by id.
Blank documents are skipped (counted by the caller).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from jaxtune.data.loaders import file_kind, get_field, iter_file, resolve_paths
from jaxtune.errors import DataError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Document:
    """One unit of source text and its stable id (``source_id`` in provenance)."""

    id: str
    text: str


def split_chunks(text: str, max_chars: int) -> list[str]:
    """Cuts ``text`` into pieces of at most ``max_chars`` characters.

    Paragraphs (blank-line separated) are packed greedily; a paragraph longer than
    ``max_chars`` is cut at sentence ends, and a sentence longer than that at spaces
    (a single word longer than ``max_chars`` is cut hard). Pieces are stripped; blank
    pieces are dropped.
    """
    units: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if len(para) <= max_chars:
            units.append(para)
            continue
        for sent in _SENTENCE_END.split(para):
            while len(sent) > max_chars:
                cut = sent.rfind(" ", 0, max_chars + 1)
                cut = cut if cut > 0 else max_chars
                units.append(sent[:cut])
                sent = sent[cut:].lstrip()
            units.append(sent)
    chunks: list[str] = []
    for unit in (u for u in units if u.strip()):
        sep = "\n\n" if "\n" in unit or not chunks else " "
        if chunks and len(chunks[-1]) + len(sep) + len(unit) <= max_chars:
            chunks[-1] = chunks[-1] + sep + unit
        else:
            chunks.append(unit)
    return chunks


def _pieces(doc_id: str, text: str, chunk_chars: int | None) -> list[Document]:
    if not text.strip():
        return []
    if not chunk_chars or len(text) <= chunk_chars:
        return [Document(doc_id, text.strip())]
    return [
        Document(f"{doc_id}#chunk{i}", c) for i, c in enumerate(split_chunks(text, chunk_chars))
    ]


def _text_documents(path: Path, name: str, chunk_chars: int | None) -> list[Document]:
    # iter_file decodes (and reports bad UTF-8 by line); the blocks of a file join back.
    text = "".join(rec.row["text"] for rec in iter_file(path))
    return _pieces(name, text, chunk_chars)


def _row_documents(
    path: Path, name: str, text_field: str, id_field: str | None, chunk_chars: int | None
) -> tuple[list[Document], int]:
    docs, blank = [], 0
    for rec in iter_file(path):
        if rec.error is not None:
            raise rec.error
        where = rec.source.replace(str(path), name, 1)
        try:
            text = get_field(rec.row, text_field)
        except KeyError:
            fields = ", ".join(sorted(rec.row)[:8])
            raise DataError(
                f"{where}: no field {text_field!r} (--text-field); the row has {fields}"
            ) from None
        if not isinstance(text, str):
            raise DataError(
                f"{where}: field {text_field!r} is {type(text).__name__}, expected text"
            )
        doc_id = where
        if id_field:
            try:
                doc_id = str(get_field(rec.row, id_field))
            except KeyError:
                raise DataError(f"{where}: no field {id_field!r} (--id-field)") from None
        pieces = _pieces(doc_id, text, chunk_chars)
        blank += not pieces
        docs.extend(pieces)
    return docs, blank


def load_documents(
    inputs: list[str],
    *,
    text_field: str = "text",
    id_field: str | None = None,
    chunk_chars: int | None = None,
) -> tuple[list[Document], int]:
    """Reads every input into documents, in input order then file order.

    Args:
      inputs: file / glob / directory / saved-dataset specs (``pkg:`` allowed).
      text_field: the text column of row files.
      id_field: a column holding each row's id (default: ``PATH:LINE``).
      chunk_chars: cut longer documents into chunks of at most this many characters.

    Returns:
      (documents, number of blank documents skipped).

    Raises:
      DataError: a missing or unsupported input, a bad row, a missing field, a
        duplicate id.
    """
    if chunk_chars is not None and chunk_chars < 1:
        raise DataError(f"--chunk-chars: got {chunk_chars}, expected an integer >= 1")
    docs: list[Document] = []
    blank = 0
    for spec in inputs:
        paths = resolve_paths(spec, "--input")
        for path in paths:
            name = spec if len(paths) == 1 else str(path)
            if file_kind(path) == "text":
                found = _text_documents(path, name, chunk_chars)
                skipped = int(not found)
            else:
                found, skipped = _row_documents(path, name, text_field, id_field, chunk_chars)
            docs.extend(found)
            blank += skipped
    seen: set[str] = set()
    for d in docs:
        if d.id in seen:
            hint = " (--id-field values must be unique)" if id_field else " (an input given twice?)"
            raise DataError(f"document id {d.id!r} occurs twice{hint}")
        seen.add(d.id)
    if not docs:
        raise DataError(f"--input {' '.join(inputs)}: no documents with text")
    return docs, blank
