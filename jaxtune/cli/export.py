"""``jaxtune export``: a run or checkpoint -> merged HF directory or PEFT adapter.

What is written is reloaded and its logits compared with the trained model before the
command succeeds (the printed max |logit diff|).
"""

from __future__ import annotations

from jaxtune.atomic import check_out_dir, overwriting
from jaxtune.errors import ConfigError
from jaxtune.export.classifier import export_classifier
from jaxtune.export.peft import export_adapter, export_merged
from jaxtune.loading import from_pretrained, load_tokenizer, model_kind, run_model_source
from jaxtune.models.heads import SequenceClassifier
from jaxtune.resources import resolve_path


def run(args) -> int:
    src = resolve_path(args.src)
    check_out_dir(args.out, args.overwrite)  # refuse before loading anything
    if args.adapter and model_kind(src) != "run":
        raise ConfigError(
            f"{src}: --adapter needs a training run directory (it holds the base model path)"
        )
    model = from_pretrained(src)
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
