"""Parameter-efficient fine-tuning: LoRA / DoRA, bottleneck adapters, trainable filters.

Typical use (the trainer does this)::

    model = jaxtune.from_pretrained(path, scan_layers=not cfg.peft.unfreeze_top_layers)
    apply_peft(model, cfg.peft, nnx.Rngs(seed))
    filt = trainable_filter(model, cfg.peft)
    graphdef, trainable, frozen = nnx.split(model, filt, ...)
    print(summary(model, filt)["text"])
"""

from __future__ import annotations

from flax import nnx

from jaxtune.errors import ConfigError
from jaxtune.peft.adapters import AdapterParam, BottleneckAdapter, add_adapters, has_adapters
from jaxtune.peft.lora import LoraSpec, add_lora, lora_linears, merge, select_targets
from jaxtune.peft.trainable import (
    TrainableFilter,
    abstract_peft_model,
    apply_peft,
    summary,
    trainable_filter,
)

__all__ = [
    "AdapterParam",
    "BottleneckAdapter",
    "LoraSpec",
    "TrainableFilter",
    "abstract_peft_model",
    "add_adapters",
    "add_lora",
    "apply_peft",
    "has_adapters",
    "has_lora",
    "lora_linears",
    "merge",
    "merged_copy",
    "select_targets",
    "summary",
    "trainable_filter",
]


def has_lora(model: nnx.Module) -> bool:
    return bool(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))


def merged_copy(model: nnx.Module) -> nnx.Module:
    """The model with LoRA/DoRA folded into its base weights (the input is untouched).

    Raises:
      ConfigError: the model has bottleneck adapters, which are nonlinear and cannot be
        folded into HF weights (save a jaxtune checkpoint instead).
    """
    if has_adapters(model):
        raise ConfigError(
            "merged export: bottleneck adapters cannot be merged into Hugging Face weights; "
            "save the jaxtune checkpoint instead"
        )
    if not has_lora(model):
        return model
    return merge(model)
