"""``jaxtune export``: a run or checkpoint -> merged HF directory, PEFT adapter or GGUF file.

What is written is reloaded and its logits compared with the trained model before the
command succeeds (the printed max |logit diff|; for GGUF also the top-1 agreement).
"""

from __future__ import annotations

from jaxtune.atomic import check_out_dir, overwriting
from jaxtune.config import load_config
from jaxtune.data.formats import prompt_chat_template
from jaxtune.errors import ConfigError
from jaxtune.export.classifier import export_classifier
from jaxtune.export.gguf import export_gguf, gguf_kind
from jaxtune.export.peft import export_adapter, export_merged
from jaxtune.loading import from_pretrained, load_tokenizer, model_kind, run_model_source
from jaxtune.models.heads import SequenceClassifier
from jaxtune.resources import resolve_path


def run(args) -> int:
    src = resolve_path(args.src)
    check_out_dir(args.out, args.overwrite)  # refuse before loading anything
    gguf = getattr(args, "gguf", False)
    if gguf:
        gguf_kind(args.gguf_type)  # a bad type fails before the model loads
    elif getattr(args, "gguf_type", "f32") != "f32" or getattr(args, "min_top1", None) is not None:
        raise ConfigError("--gguf-type and --min-top1 go with --gguf")
    if args.adapter and model_kind(src) != "run":
        raise ConfigError(
            f"{src}: --adapter needs a training run directory (it holds the base model path)"
        )
    model = from_pretrained(src)
    if gguf:
        if isinstance(model, SequenceClassifier):
            raise ConfigError(f"{src}: a classification model has no GGUF form; use --merged")
        report = export_gguf(
            model,
            args.out,
            tokenizer=load_tokenizer(src),
            kind=args.gguf_type,
            source=str(src),
            name=src.stem if model_kind(src) == "gguf" else src.name,
            finetune=_finetune(src),
            chat_template=_trained_template(src),
            min_top1=args.min_top1,
            overwrite=args.overwrite,
        )
        print(report.summary())
        return 0
    if isinstance(model, SequenceClassifier):
        if args.adapter:
            raise ConfigError(
                f"{src}: a classification run exports as a merged "
                "*ForSequenceClassification directory; use --merged"
            )
        with overwriting(args.overwrite):
            diff = export_classifier(model, args.out, tokenizer=load_tokenizer(src))
    elif args.adapter:
        diff = export_adapter(model, args.out, run_model_source(src), overwrite=args.overwrite)
    else:
        tokenizer = load_tokenizer(src)
        diff = export_merged(
            model, args.out, tokenizer=tokenizer, dtype=args.dtype, overwrite=args.overwrite
        )
    print(f"wrote {args.out} (verified: max |logit diff| {diff:.2e})")
    return 0


def _finetune(src) -> str | None:
    """``general.finetune`` for a run: its PEFT method and objective, e.g. ``lora-sft``."""
    if model_kind(src) != "run":
        return None
    cfg = load_config(src / "config.yaml")
    return f"{cfg.peft.method}-{cfg.train.objective}"


def _trained_template(src) -> str | None:
    """A run trained on a text prompt template chats in that template (see
    :func:`jaxtune.data.formats.prompt_chat_template`); None keeps the tokenizer's."""
    if model_kind(src) != "run":
        return None
    return prompt_chat_template(load_config(src / "config.yaml").data)
