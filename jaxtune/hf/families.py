"""Each model family's HF module (key table, config conversion), by family.

The model side (:data:`jaxtune.models.FAMILIES`) knows nothing of HF: this table, one
layer up, maps a family to ``jaxtune.hf.<family>`` (``KEYMAP``, ``IGNORED``,
``config_from_hf``, ``config_to_hf``). Adding a family adds its module here.
"""

from __future__ import annotations

from types import ModuleType

from jaxtune.hf import bert, gemma, gpt2, gpt_neo, llama
from jaxtune.hf.keymap import KeyMap
from jaxtune.models import Family, family_of_config

HF_MODULES: dict[str, ModuleType] = {
    "llama": llama,
    "gemma": gemma,
    "gpt2": gpt2,
    "gpt_neo": gpt_neo,
    "bert": bert,
}


def hf_module(family: Family) -> ModuleType:
    """The ``jaxtune.hf`` module of a model family."""
    return HF_MODULES[family.name]


def keymap_for(cfg) -> KeyMap:
    """The key table for ``cfg``: the family module's ``keymap_for(cfg)`` when it has one
    (one family, several HF naming schemes: BERT / DistilBERT), else its ``KEYMAP``."""

    hf = hf_module(family_of_config(cfg))
    pick = getattr(hf, "keymap_for", None)
    return pick(cfg) if pick is not None else hf.KEYMAP
