"""Parameter-efficient fine-tuning: LoRA / DoRA, bottleneck adapters, trainable filters."""

from __future__ import annotations

from flax import nnx


def has_lora(model: nnx.Module) -> bool:
    return bool(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))


def merged_copy(model: nnx.Module) -> nnx.Module:
    """The model with LoRA/DoRA folded into its base weights (the input is untouched)."""
    if not has_lora(model):
        return model
    from jaxtune.peft.lora import merge

    return merge(model)
