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


def _readme_block_commands() -> list[list[str]]:
    import shlex

    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- readme-check: start -->")[1].split("<!-- readme-check: end -->")[0]
    lines = [ln.split("#")[0].strip() for ln in block.splitlines() if not ln.startswith("```")]
    return [shlex.split(ln) for ln in lines if ln]


def test_readme_commands_parse_and_their_configs_load(monkeypatch):
    """Every command of the README's "Using it" block is a valid jaxtune command line
    (options and config overrides); `make readme-check` runs them for real."""
    from jaxtune.cli import build_parser
    from jaxtune.config import load_config

    monkeypatch.chdir(ROOT)
    commands = _readme_block_commands()
    assert len(commands) >= 6
    parser = build_parser()
    for argv in commands:
        assert argv[0] == "jaxtune"
        args, extra = parser.parse_known_args(argv[1:])
        assert not [a for a in extra if a.startswith("-")], argv
        if args.command in ("train", "data"):
            overrides = [*args.overrides, *[a for a in extra if "=" in a]]
            load_config(args.config, overrides)
