"""Regenerates docs/config_reference.md from the config schema (tests check it is current).

python scripts/gen_config_reference.py
"""

from pathlib import Path

from jaxtune.config import config_reference_markdown

OUT = Path(__file__).resolve().parent.parent / "docs" / "config_reference.md"


def render() -> str:
    # A test compares the file with this output, so the reference cannot drift.
    return config_reference_markdown().strip() + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
