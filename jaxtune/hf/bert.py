"""HF <-> jaxtune for BERT-family encoders: BERT, MiniLM (BertModel weights), DistilBERT.

One family module serves two HF naming schemes: ``keymap_for(cfg)`` picks the BERT or the
DistilBERT table; ``KEYMAP`` (the union) matches either on import.
``canonical_name`` strips task-model prefixes (``bert.``, ``distilbert.``), renames the
old ``LayerNorm.gamma/beta`` tensors and drops task heads (MLM, NSP, QA, classifier), so
the encoder loads from ``BertModel``, ``BertForMaskedLM``, ``BertForSequenceClassification``...
checkpoints alike. Classification heads are read by ``jaxtune.hf.classifier.load_classifier``.
"""

from __future__ import annotations

import re
import warnings

from jaxtune.errors import ConfigError
from jaxtune.hf.keymap import KeyMap, Rule
from jaxtune.models.bert import ACTIVATIONS, BertConfig

MODEL_TYPES = {"bert", "distilbert"}
PREFIXES = ("bert.", "distilbert.")
# Task heads that are not part of the encoder (dropped on import).
HEAD_PREFIXES = (
    "cls.",
    "classifier.",
    "pre_classifier.",
    "qa_outputs.",
    "vocab_transform.",
    "vocab_layer_norm.",
    "vocab_projector.",
)
# Architectures built with ``add_pooling_layer=False`` (their checkpoints have no pooler).
NO_POOLER = ("ForMaskedLM", "ForTokenClassification", "ForQuestionAnswering", "LMHeadModel")
IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids")

HARMLESS = {
    "transformers_version",
    "architectures",
    "model_type",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "use_cache",
    "gradient_checkpointing",
    "initializer_range",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "dropout",
    "attention_dropout",
    "qa_dropout",
    "seq_classif_dropout",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "tokenizer_class",
    "sinusoidal_pos_embds",  # the sinusoidal table is saved as ordinary weights
    "tie_weights_",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "hidden_act",
    "dim",
    "hidden_dim",
    "n_layers",
    "n_heads",
    "activation",
}
# Fields that change the math; rejected unless they hold the value implemented here.
MATH_FIELDS = {
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
    "quantization_config": None,
}


def _linear(hf: str, ours: str) -> list[Rule]:
    return [Rule(f"{hf}.weight", f"{ours}/kernel", "T"), Rule(f"{hf}.bias", f"{ours}/bias")]


def _norm(hf: str, ours: str) -> list[Rule]:
    return [Rule(f"{hf}.weight", f"{ours}/scale"), Rule(f"{hf}.bias", f"{ours}/bias")]


def _embeddings(token_types: bool) -> list[Rule]:
    rules = [
        Rule("embeddings.word_embeddings.weight", "embed_tokens/embedding"),
        Rule("embeddings.position_embeddings.weight", "position_embed/embedding"),
    ]
    if token_types:
        rules.append(Rule("embeddings.token_type_embeddings.weight", "token_type_embed/embedding"))
    return rules + _norm("embeddings.LayerNorm", "embed_norm")


def _bert_rules() -> list[Rule]:
    layer = "encoder.layer.{i}"
    rules = _embeddings(True)
    for hf, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        rules += _linear(f"{layer}.attention.self.{hf}", f"layers/attn/{ours}")
    rules += _linear(f"{layer}.attention.output.dense", "layers/attn/o_proj")
    rules += _norm(f"{layer}.attention.output.LayerNorm", "layers/attn_norm")
    rules += _linear(f"{layer}.intermediate.dense", "layers/mlp/up_proj")
    rules += _linear(f"{layer}.output.dense", "layers/mlp/down_proj")
    rules += _norm(f"{layer}.output.LayerNorm", "layers/mlp_norm")
    rules += _linear("pooler.dense", "pooler")
    return rules


def _distilbert_rules() -> list[Rule]:
    layer = "transformer.layer.{i}"
    rules = _embeddings(False)
    for hf, ours in (("q_lin", "q_proj"), ("k_lin", "k_proj"), ("v_lin", "v_proj")):
        rules += _linear(f"{layer}.attention.{hf}", f"layers/attn/{ours}")
    rules += _linear(f"{layer}.attention.out_lin", "layers/attn/o_proj")
    rules += _norm(f"{layer}.sa_layer_norm", "layers/attn_norm")
    rules += _linear(f"{layer}.ffn.lin1", "layers/mlp/up_proj")
    rules += _linear(f"{layer}.ffn.lin2", "layers/mlp/down_proj")
    rules += _norm(f"{layer}.output_layer_norm", "layers/mlp_norm")
    return rules


BERT_KEYMAP = KeyMap(_bert_rules())
DISTILBERT_KEYMAP = KeyMap(_distilbert_rules())
# The union matches tensors of either naming (the embedding rules are shared).
KEYMAP = KeyMap(
    BERT_KEYMAP.rules + [r for r in DISTILBERT_KEYMAP.rules if r not in BERT_KEYMAP.rules]
)


def keymap_for(cfg: BertConfig) -> KeyMap:
    """The key table of ``cfg``'s naming scheme (exports must not mix the two)."""
    return DISTILBERT_KEYMAP if cfg.family == "distilbert" else BERT_KEYMAP


def canonical_name(name: str) -> str | None:
    """HF tensor name as the key table spells it; None for task-head tensors."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if name.startswith(HEAD_PREFIXES):
        return None
    # Original Google checkpoints name LayerNorm parameters gamma / beta.
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
    return re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)


def _check(d: dict, source: str, act_key: str) -> None:
    act = d.get(act_key, "gelu")
    if act not in ACTIVATIONS:
        raise ConfigError(
            f"{source}: {act_key} {act!r} is not supported (supported: {sorted(ACTIVATIONS)})"
        )
    for key, ok in MATH_FIELDS.items():
        if key in d and d[key] is not None and d[key] != ok:
            raise ConfigError(
                f"{source}: field {key!r} = {d[key]!r} changes the model's math and is not "
                f"supported (expected {ok!r} or absent)"
            )
    unknown = sorted(set(d) - HARMLESS - set(MATH_FIELDS))
    if unknown:
        warnings.warn(f"{source}: ignoring config fields {unknown}", stacklevel=3)


def config_from_hf(d: dict, source: str = "config.json") -> BertConfig:
    """Translates a BERT / DistilBERT ``config.json`` dict into :class:`BertConfig`."""
    mtype = d.get("model_type")
    if mtype not in MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {mtype!r} is not a BERT-family model")
    archs = d.get("architectures") or []
    try:
        if mtype == "distilbert":
            _check(d, source, "activation")
            return BertConfig(
                vocab_size=d["vocab_size"],
                hidden_size=d["dim"],
                intermediate_size=d["hidden_dim"],
                num_layers=d["n_layers"],
                num_heads=d["n_heads"],
                max_position_embeddings=d.get("max_position_embeddings", 512),
                type_vocab_size=0,
                layer_norm_eps=1e-12,  # fixed in HF's DistilBERT
                hidden_act=d.get("activation", "gelu"),
                pooler=False,
                pad_token_id=d.get("pad_token_id"),
                family="distilbert",
            )
        _check(d, source, "hidden_act")
        return BertConfig(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            max_position_embeddings=d.get("max_position_embeddings", 512),
            type_vocab_size=d.get("type_vocab_size", 2),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
            hidden_act=d.get("hidden_act", "gelu"),
            pooler=not any(a.endswith(NO_POOLER) for a in archs),
            pad_token_id=d.get("pad_token_id"),
            family="bert",
        )
    except KeyError as e:
        raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None


def config_to_hf(cfg: BertConfig) -> dict:
    """HF ``config.json`` dict of the bare encoder (``BertModel`` / ``DistilBertModel``)."""
    if cfg.family == "distilbert":
        return {
            "architectures": ["DistilBertModel"],
            "model_type": "distilbert",
            "vocab_size": cfg.vocab_size,
            "dim": cfg.hidden_size,
            "hidden_dim": cfg.intermediate_size,
            "n_layers": cfg.num_layers,
            "n_heads": cfg.num_heads,
            "max_position_embeddings": cfg.max_position_embeddings,
            "activation": cfg.hidden_act,
            "sinusoidal_pos_embds": False,
            "pad_token_id": cfg.pad_token_id,
        }
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": max(cfg.type_vocab_size, 1),
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": cfg.hidden_act,
        "position_embedding_type": "absolute",
        "pad_token_id": cfg.pad_token_id,
    }
