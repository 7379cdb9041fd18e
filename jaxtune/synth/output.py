"""The files of ``jaxtune data generate``: append-only, resumable, never mixed.

Three files share OUT's name:

* ``OUT`` (e.g. ``pairs.jsonl``): accepted rows ``{"instruction", "input", "output",
  "provenance"}``;
* ``OUT.rejected.jsonl`` (``pairs.rejected.jsonl``): rejected samples with their
  ``reason``, ``finish`` (``eos``, ``length``), raw ``text``, ``parsed`` fields (when the
  reply parsed) and ``provenance``;
* ``OUT.stats.json`` (``pairs.stats.json``): the settings of the run, counts by reason,
  and how many bytes of each JSONL file are *committed*.

A batch is committed in three steps: its rows are appended to both JSONL files, both are
flushed and fsynced, then the stats file is replaced atomically with the new sizes. The
stats file is written before ``OUT`` is created, so an ``OUT`` without one was not
written by jaxtune and is refused. On resume, bytes after the committed size are the
rows of a batch that was interrupted: they are dropped (only when every complete line
there is a jaxtune row, the last one possibly cut mid-write) and said so; anything else
there, a file shorter than committed, or different settings is refused without
touching a file.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from jaxtune.atomic import atomic_file
from jaxtune.errors import ConfigError
from jaxtune.synth.filters import REASONS

FORMAT = "jaxtune data generate 1"


def side_paths(out: Path) -> tuple[Path, Path]:
    """(rejected file, stats file) next to ``out``."""
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(f"{stem}.rejected.jsonl"), out.with_name(f"{stem}.stats.json")


@dataclass
class OutputState:
    """What is already written: accepted rows (for the duplicate filters) and progress."""

    accepted: list[dict] = field(default_factory=list)
    samples: dict[str, set[int]] = field(default_factory=dict)  # doc id -> samples recorded
    with_pairs: set[str] = field(default_factory=set)  # doc ids with an accepted row
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    seconds: float = 0.0
    # Bytes of OUT / OUT.rejected.jsonl to drop before appending (an interrupted batch).
    truncate: dict[str, int] = field(default_factory=dict)

    def record(self, row: dict, reason: str | None) -> None:
        """Counts one written row (``reason`` None: accepted)."""
        prov = row["provenance"]
        self.samples.setdefault(prov["source_id"], set()).add(int(prov["sample"]))
        if reason is None:
            self.accepted.append(row)
            self.with_pairs.add(prov["source_id"])
        else:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1


def _is_row(line: bytes) -> bool:
    try:
        row = json.loads(line)
        return isinstance(row, dict) and "source_id" in row.get("provenance", {})
    except (ValueError, AttributeError, TypeError):
        return False


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def _read_committed(path: Path, committed: int) -> tuple[list[dict], int]:
    """Rows in the committed part of ``path`` and the size to truncate to (or -1)."""
    data = path.read_bytes() if path.exists() else b""
    if len(data) < committed:
        raise ConfigError(
            f"{path}: shorter than the {committed} bytes jaxtune recorded in its stats file "
            f"(edited or truncated outside jaxtune); use another --out"
        )
    head, tail = data[:committed], data[committed:]
    if tail:
        *complete, last = tail.split(b"\n")
        # A line cut off mid-write does not parse, and starts as each of our rows does; a
        # complete JSON line without provenance is a user's, and is never dropped.
        ours = all(_is_row(line) for line in complete) and (
            not last
            or _is_row(last)
            or (last.startswith((b'{"instruction"', b'{"reason"')) and not _parses(last))
        )
        if not ours:
            raise ConfigError(
                f"{path}: {len(tail)} bytes after the last batch jaxtune recorded are not its "
                "rows (edited outside jaxtune?); use another --out"
            )
    rows = [json.loads(line) for line in head.splitlines() if line.strip()]
    return rows, committed if tail else -1


def open_output(out: Path, settings: dict) -> OutputState:
    """Reads what an earlier run with the same settings wrote; checks, writes nothing.

    Raises:
      ConfigError: OUT exists without jaxtune's stats file, the stats file is not
        jaxtune's, the settings differ, or the files were changed outside jaxtune.
    """
    rejected_path, stats_path = side_paths(out)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory; expected a .jsonl file path")
    if not stats_path.exists():
        for p in (out, rejected_path):
            if p.exists():
                raise ConfigError(
                    f"--out {out}: {p} exists and is not a jaxtune data generate output "
                    f"(no {stats_path.name}); choose another --out"
                )
        return OutputState()
    try:
        stats = json.loads(stats_path.read_text())
        ok = isinstance(stats, dict) and stats.get("format") == FORMAT
    except (ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ConfigError(f"--out {out}: {stats_path} is not a jaxtune data generate stats file")
    old = stats.get("settings", {})
    changed = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if changed:
        diff = "; ".join(f"{k}: {old.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
        raise ConfigError(
            f"--out {out} was generated with other settings ({diff}); rerun with the same "
            "options to resume, or choose another --out"
        )
    state = OutputState(seconds=float(stats.get("seconds", 0.0)))
    committed = stats.get("committed", {})
    for path, key in ((out, "out"), (rejected_path, "rejected")):
        rows, cut = _read_committed(path, int(committed.get(key, 0)))
        if cut >= 0:
            state.truncate[str(path)] = cut
        for row in rows:
            state.record(row, row.get("reason") if key == "rejected" else None)
    return state


class OutputWriter:
    """Appends committed batches to OUT and OUT.rejected.jsonl and rewrites the stats."""

    def __init__(self, out: Path, settings: dict, state: OutputState, extra: dict):
        self.out = out
        self.rejected_path, self.stats_path = side_paths(out)
        self.settings, self.state, self.extra = settings, state, extra
        for path, size in state.truncate.items():
            print(
                f"note: {path}: dropping {os.path.getsize(path) - size} bytes of an interrupted "
                "batch (rows after the last committed batch; they are generated again)",
                file=sys.stderr,
            )
            os.truncate(path, size)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.write_stats()  # before OUT exists: an OUT without stats is never jaxtune's
        self.files = {"out": open(out, "ab"), "rejected": open(self.rejected_path, "ab")}

    def commit(self, accepted: list[dict], rejected: list[dict], seconds: float) -> None:
        """Appends one batch's rows, fsyncs them, then records the batch in the stats."""
        for key, rows in (("out", accepted), ("rejected", rejected)):
            f = self.files[key]
            f.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        for row in accepted:
            self.state.record(row, None)
        for row in rejected:
            self.state.record(row, row["reason"])
        self.state.seconds += seconds
        self.write_stats()

    def summary(self) -> dict:
        """The counts written to the stats file (cumulative over resumed runs)."""
        s = self.state
        n_rejected = sum(s.rejected.values())
        return {
            "documents": {
                **self.extra,
                "done": sum(len(v) >= self.settings["per_doc"] for v in s.samples.values()),
                "with_pairs": len(s.with_pairs),
            },
            "samples": {
                "generated": len(s.accepted) + n_rejected,
                "accepted": len(s.accepted),
                "rejected": n_rejected,
            },
            "rejected": dict(s.rejected),
            "seconds": round(s.seconds, 3),
        }

    def write_stats(self) -> None:
        committed = {
            "out": self.files["out"].tell() if hasattr(self, "files") else _size(self.out),
            "rejected": self.files["rejected"].tell()
            if hasattr(self, "files")
            else _size(self.rejected_path),
        }
        body = {"format": FORMAT, "settings": self.settings, **self.summary()}
        body["committed"] = committed
        atomic_file(self.stats_path, json.dumps(body, indent=2) + "\n")

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0
