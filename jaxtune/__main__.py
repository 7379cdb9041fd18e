"""``python -m jaxtune`` entry point."""

from jaxtune.cli import main

raise SystemExit(main())
