"""Model families and helpers to build models without allocating random weights.

Adding a family = ``models/<family>.py`` + an entry in ``FAMILIES`` (model type names
as they appear in HF ``config.json``) + ``hf/<family>.py`` and its entry in
``jaxtune.hf.families.HF_MODULES``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import ModelLoadError
from jaxtune.models.bert import BertModel
from jaxtune.models.gemma import GemmaForCausalLM
from jaxtune.models.gpt2 import GPT2LMHeadModel
from jaxtune.models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class Family:
    name: str
    model: type  # the model class
    model_types: tuple[str, ...]

    def model_class(self) -> type:
        return self.model


FAMILIES = {
    "llama": Family(
        "llama",
        LlamaForCausalLM,
        ("llama", "mistral", "qwen2"),
    ),
    "gemma": Family(
        "gemma",
        GemmaForCausalLM,
        ("gemma", "gemma2", "gemma3_text"),
    ),
    "gpt2": Family("gpt2", GPT2LMHeadModel, ("gpt2",)),
    # GPT-Neo shares the GPT-2 model code; its key table differs (nn.Linear, not Conv1D).
    "gpt_neo": Family("gpt_neo", GPT2LMHeadModel, ("gpt_neo",)),
    # Encoders: BERT and DistilBERT share one model; hf.bert picks the tensor names.
    "bert": Family("bert", BertModel, ("bert", "distilbert")),
}


def family_for_model_type(model_type: str | None) -> Family | None:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    return None


def family_of_config(cfg) -> Family:
    fam = family_for_model_type(getattr(cfg, "family", None))
    if fam is None:
        raise ValueError(f"no model family for config {type(cfg).__name__}")
    return fam


def config_to_dict(cfg) -> dict:
    """JSON-able dict of a model config dataclass (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def json_ready(x):
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return x


def config_from_dict(d: dict):
    """Inverse of :func:`config_to_dict` (lists back to tuples)."""
    fam = family_for_model_type(d.get("family"))
    cls = fam.model_class().config_class
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in d.items():
        if k not in fields:
            continue
        if k == "rope_scaling" and v is not None:
            v = tuple((a, b) for a, b in v)
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return cls(**kw)


def abstract_model(cfg, dtype=jnp.float32):
    """The model with ``jax.ShapeDtypeStruct`` leaves: structure and metadata, no memory."""
    cls = family_of_config(cfg).model_class()
    return nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def init_model(cfg, dtype=jnp.float32, seed: int = 0):
    """A randomly initialised model (tests and from-scratch experiments)."""
    cls = family_of_config(cfg).model_class()
    return cls(cfg, dtype=dtype, rngs=nnx.Rngs(seed))


def fill_model(abstract, values: dict) -> nnx.Module:
    """Builds a concrete model from an abstract one and ``{flat path: jax.Array}``.

    Every variable of ``abstract`` must have a value; shapes must match.
    """
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    missing = [p for p, _ in flat if p not in values]
    if missing:
        raise KeyError(f"no value for {missing[:3]}")
    for path, var in flat:
        v = values[path]
        if tuple(v.shape) != tuple(var.shape):
            raise ValueError(f"{path}: shape {v.shape} != expected {var.shape}")
        var.set_value(v)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def param_count(model_or_state, variable_type=nnx.Param) -> int:
    state = (
        nnx.state(model_or_state, variable_type)
        if isinstance(model_or_state, nnx.Module)
        else model_or_state
    )
    return int(sum(x.size for x in jax.tree.leaves(state)))


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype
