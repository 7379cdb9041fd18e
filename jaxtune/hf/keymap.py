"""Declarative HF <-> jaxtune parameter key tables, used in both directions.

A family's table is a list of :class:`Rule`: an HF tensor name pattern (``{i}`` = layer
index), our parameter path (``/``-separated; layer rules start with ``layers/``) and a
named transform. The same rules drive import (HF -> ours) and export (ours -> HF), so
the two cannot drift apart.

Stacked (scanned) layers keep one array per parameter with a leading ``layers`` axis;
unscanned layers live at ``layers/<i>/...``. Rules are written once for both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Path = tuple  # a flat-state path such as ("layers", "attn", "q_proj", "kernel")


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.swapaxes(x, -1, -2)


# name -> (hf_to_ours, ours_to_hf)
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "id": (lambda x: x, lambda x: x),
    # torch Linear stores [out, in]; our kernels are [in, out].
    "T": (_transpose, _transpose),
}


@dataclass(frozen=True)
class Rule:
    """One tensor mapping. ``hf`` may contain ``{i}``; ``ours`` is a ``/`` path."""

    hf: str
    ours: str
    transform: str = "id"

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf

    def hf_regex(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.hf).replace(r"\{i\}", r"(?P<i>\d+)") + "$")

    def ours_path(self, layer: int | None, scanned: bool) -> tuple[Path, int | None]:
        """(flat-state path, index on the stacked axis or None)."""
        parts = tuple(self.ours.split("/"))
        if not self.layered:
            return parts, None
        assert parts[0] == "layers", self.ours
        if scanned:
            return parts, layer
        return ("layers", layer, *parts[1:]), None

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        return TRANSFORMS[self.transform][0](x)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        return TRANSFORMS[self.transform][1](x)


class KeyMap:
    """Compiled rule table of one family."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self._compiled = [(r.hf_regex(), r) for r in rules]

    def match(self, hf_name: str) -> tuple[Rule, int | None] | None:
        """(rule, layer index) for an HF tensor name, or None if no rule knows it."""
        for regex, rule in self._compiled:
            m = regex.match(hf_name)
            if m:
                return rule, (int(m.group("i")) if rule.layered else None)
        return None

    def hf_names(self, rule: Rule, num_layers: int) -> list[tuple[str, int | None]]:
        if rule.layered:
            return [(rule.hf.format(i=i), i) for i in range(num_layers)]
        return [(rule.hf, None)]


def path_str(path: Path) -> str:
    return "/".join(str(p) for p in path)
