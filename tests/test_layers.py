"""The package's layering (ARCHITECTURE.md) cannot regress silently: import-linter's
contracts in pyproject.toml (layers, and no import cycles inside any package) hold,
counting imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

from importlinter import configuration
from importlinter.application.use_cases import lint_imports

ROOT = Path(__file__).resolve().parent.parent


def test_import_linter_contracts_are_kept(monkeypatch):
    monkeypatch.chdir(ROOT)
    configuration.configure()  # what the ``lint-imports`` command does first
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_logo=True)


def test_no_jaxtune_import_inside_a_function():
    """Imports of jaxtune modules sit at the top of each file, where the layers contract
    and a reader see them; the CLI's one deferred import (so ``jaxtune --help`` does not
    import jax) goes through ``importlib`` by a name from its command table."""
    found = []
    for path in sorted((ROOT / "jaxtune").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxtune"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                if isinstance(node, ast.Import) and any(
                    a.name.startswith("jaxtune") for a in node.names
                ):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found
