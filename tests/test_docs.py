"""Docs generated from code must be current; every config in configs/ must load."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_current():
    spec = importlib.util.spec_from_file_location(
        "gen", ROOT / "scripts" / "gen_config_reference.py"
    )
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    current = (ROOT / "docs" / "config_reference.md").read_text()
    assert current == gen.render(), "run: python scripts/gen_config_reference.py"


def test_readme_links_the_reference_and_names_both_commands():
    readme = (ROOT / "README.md").read_text()
    assert "docs/config_reference.md" in readme
    assert "make quickstart" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
