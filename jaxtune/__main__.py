"""``python -m jaxtune`` entry point."""

from jaxtune.cli import entry

raise SystemExit(entry())
