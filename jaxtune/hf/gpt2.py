"""HF <-> jaxtune for GPT-2 (``gpt2``).

GPT-2 stores its projections as ``Conv1D`` weights [in, out], which is already our
kernel layout: the transform is ``id`` (GPT-Neo, with ``nn.Linear``, has its own table
in :mod:`jaxtune.hf.gpt_neo`). Checkpoints exist both with the ``transformer.`` prefix
(saved from ``GPT2LMHeadModel``) and without it (the original hub upload, saved from
``GPT2Model``); the key map accepts both and writes the prefixed form.
"""

from __future__ import annotations

import warnings

from jaxtune.errors import ConfigError
from jaxtune.hf.keymap import KeyMap, Rule
from jaxtune.hf.llama import HARMLESS as COMMON_HARMLESS
from jaxtune.models.gpt2 import ACTIVATIONS, GPT2Config

ARCHITECTURES = {"GPT2LMHeadModel", "GPT2Model"}

HARMLESS = COMMON_HARMLESS | {
    "n_ctx",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    "attn_pdrop",
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "summary_last_dropout",
    "scale_attn_weights",
    # Only changes how float16 scores are upcast: the float32 math is the same, and we
    # compute attention scores in float32 anyway.
    "reorder_and_upcast_attn",
    "gradient_checkpointing",
    "task_specific_params",
}
# Keys that change the math; rejected unless they hold the value we implement.
MATH_FIELDS = {
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "quantization_config": None,
}


class PrefixedKeyMap(KeyMap):
    """A key map whose rules carry a ``prefix`` that checkpoints may omit."""

    def __init__(self, rules: list[Rule], prefix: str):
        super().__init__(rules)
        self.prefix = prefix

    def match(self, hf_name: str):
        return super().match(hf_name) or super().match(self.prefix + hf_name)


def block_rules(attn: dict[str, str], transform: str, prefix: str = "transformer.") -> list[Rule]:
    """Key rules of a GPT-2-style stack; ``attn`` maps HF attention names to ours."""
    p = prefix
    rules = [
        Rule(f"{p}wte.weight", "embed_tokens/embedding"),
        Rule(f"{p}wpe.weight", "embed_positions/embedding"),
        Rule(f"{p}ln_f.weight", "norm/scale"),
        Rule(f"{p}ln_f.bias", "norm/bias"),
        Rule("lm_head.weight", "lm_head/kernel", "T"),  # an nn.Linear in both families
    ]
    for hf, ours in (("ln_1", "input_norm"), ("ln_2", "post_attn_norm")):
        rules.append(Rule(f"{p}h.{{i}}.{hf}.weight", f"layers/{ours}/scale"))
        rules.append(Rule(f"{p}h.{{i}}.{hf}.bias", f"layers/{ours}/bias"))
    mods = {**{f"attn.{k}": f"attn/{v}" for k, v in attn.items()}, "mlp.c_fc": "mlp/c_fc"}
    mods["mlp.c_proj"] = "mlp/c_proj"
    for hf, ours in mods.items():
        rules.append(Rule(f"{p}h.{{i}}.{hf}.weight", f"layers/{ours}/kernel", transform))
        rules.append(Rule(f"{p}h.{{i}}.{hf}.bias", f"layers/{ours}/bias"))
    return rules


KEYMAP = PrefixedKeyMap(
    block_rules({"c_attn": "c_attn", "c_proj": "c_proj"}, "id"), prefix="transformer."
)
# Causal-mask buffers that old transformers versions saved with the weights.
IGNORED = (".attn.bias", ".attn.masked_bias")


def check_fields(d: dict, source: str, harmless: set, math_fields: dict) -> None:
    """Rejects math-changing fields; warns about unknown ones."""
    for key, ok in math_fields.items():
        if key in d and d[key] is not None and d[key] != ok:
            raise ConfigError(
                f"{source}: field {key!r} = {d[key]!r} changes the model's math and is not "
                f"supported (expected {ok!r} or absent)"
            )
    unknown = sorted(set(d) - harmless - set(math_fields))
    if unknown:
        warnings.warn(f"{source}: ignoring config fields {unknown}", stacklevel=3)


def check_activation(name: str, source: str) -> str:
    if name not in ACTIVATIONS:
        raise ConfigError(
            f"{source}: activation_function {name!r} is not supported "
            f"(supported: {sorted(ACTIVATIONS)})"
        )
    return name


def eos(d: dict):
    e = d.get("eos_token_id")
    return tuple(e) if isinstance(e, list) else e


def config_from_hf(d: dict, source: str = "config.json") -> GPT2Config:
    """Translates an HF GPT-2 config dict into :class:`GPT2Config` (errors name ``source``)."""
    archs = d.get("architectures") or []
    if archs and not any(a in ARCHITECTURES for a in archs):
        raise ConfigError(
            f"{source}: architecture {archs[0]!r} is not supported by the gpt2 family "
            f"(supported: {sorted(ARCHITECTURES)})"
        )
    if d.get("model_type") != "gpt2":
        raise ConfigError(f"{source}: model_type {d.get('model_type')!r} is not 'gpt2'")
    check_fields(d, source, HARMLESS, MATH_FIELDS)
    try:
        hidden = d.get("n_embd", d.get("hidden_size"))
        if hidden is None:
            raise KeyError("n_embd")
        return GPT2Config(
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d.get("n_inner") or 4 * hidden,
            num_layers=d.get("n_layer", d.get("num_hidden_layers", 12)),
            num_heads=d.get("n_head", d.get("num_attention_heads", 12)),
            max_position_embeddings=d.get("n_positions", d.get("max_position_embeddings", 1024)),
            layer_norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
            activation=check_activation(d.get("activation_function", "gelu_new"), source),
            fused_qkv=True,
            scale_attn=bool(d.get("scale_attn_weights", True)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos(d),
            pad_token_id=d.get("pad_token_id"),
            family="gpt2",
        )
    except KeyError as e:
        raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None


def common_to_hf(cfg: GPT2Config) -> dict:
    return {
        "vocab_size": cfg.vocab_size,
        "activation_function": cfg.activation,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id)
        if isinstance(cfg.eos_token_id, tuple)
        else cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }


def config_to_hf(cfg: GPT2Config) -> dict:
    """HF ``config.json`` dict that transformers loads into the same architecture."""
    if not cfg.fused_qkv or any(cfg.windows):
        raise ConfigError("gpt2 export: this config uses GPT-Neo features")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": cfg.hidden_size,
        "n_inner": cfg.intermediate_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_positions": cfg.max_position_embeddings,
        "scale_attn_weights": cfg.scale_attn,
        **common_to_hf(cfg),
    }
