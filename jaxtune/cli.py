"""The ``jaxtune`` command line.

Exit codes: 0 ok, 1 runtime failure, 2 usage / config / data error. User mistakes print
one ``error:`` line (no traceback); ``JAXTUNE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import time

from jaxtune.errors import JaxtuneError

EXAMPLES = {
    "train": "jaxtune train configs/quickstart.yaml train.steps=20 run.dir=runs/try",
    "data": "jaxtune data inspect configs/quickstart.yaml",
    "convert": "jaxtune convert path/to/SmolLM2-135M-Instruct.Q4_1.gguf ckpt/smollm2",
    "export": "jaxtune export runs/quickstart/run out/merged --merged",
    "eval": "jaxtune eval --model runs/quickstart/run --tasks arc_easy --limit 200 --out runs/eval",
    "generate": 'jaxtune generate --model ckpt/smollm2 --prompt "What is the capital of France?" --chat',
}


class Parser(argparse.ArgumentParser):
    """argparse with "did you mean" suggestions for typos in commands and options."""

    def error(self, message: str):
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'?([\w-]+)'?", m.group(2))
            close = difflib.get_close_matches(m.group(1), choices, n=1)
            if close:
                message += f". Did you mean '{close[0]}'?"
        m = re.search(r"unrecognized arguments: (.*)", message)
        if m:
            options = self._all_options()
            for arg in m.group(1).split():
                flag = arg.split("=")[0]
                close = difflib.get_close_matches(flag, options, n=1)
                if flag.startswith("-") and close and close[0] == flag:
                    # Known, but to another subcommand: a suggestion would repeat it.
                    message += f". ('{flag}' is not an option of this command; see its --help)"
                elif flag.startswith("-") and close:
                    message += f". Did you mean '{close[0]}' for '{flag}'?"
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _all_options(self) -> list[str]:
        # Leftover arguments are reported by the top-level parser: look in subcommands too.
        out = []
        for action in self._actions:
            out.extend(action.option_strings)
            choices = getattr(action, "choices", None)
            for sub in choices.values() if isinstance(choices, dict) else ():
                if isinstance(sub, Parser):
                    out.extend(sub._all_options())
        return out


def _sub(subparsers, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    epilog = f"example:\n  {EXAMPLES[name]}" if name in EXAMPLES else None
    return subparsers.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_train(sub) -> None:
    p = _sub(
        sub,
        "train",
        "fine-tune a model from a config",
        "Fine-tune (full, LoRA, DoRA, adapters) from a YAML config; key=value arguments "
        "override config keys. Re-running with the same run.dir resumes from its latest "
        "checkpoint; SIGTERM saves a checkpoint and exits 0.",
    )
    p.add_argument("config", help="YAML config (see configs/ and the README's config reference)")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 peft.rank=16"
    )
    from jaxtune.train.distributed import add_distributed_args

    add_distributed_args(p)


def _add_eval(sub) -> None:
    from jaxtune.eval.command import add_parser

    add_parser(sub, lambda name, help_text, description: _sub(sub, name, help_text, description))


def _add_plan(sub) -> None:
    from jaxtune.train.command import add_plan_parser

    add_plan_parser(sub, _sub)


def _add_data(sub) -> None:
    p = _sub(
        sub,
        "data",
        "inspect a dataset before training",
        "Data tools. 'inspect' renders examples, counts tokens, truncation, padding, loss-mask "
        "coverage, duplicates and label balance, and writes report.md/report.json/lengths.png.",
    )
    p.add_argument("action", choices=["inspect"], help="what to do (inspect)")
    p.add_argument("config", help="YAML config with a data section")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.train=file.jsonl")
    p.add_argument("--out", help="report directory (default: RUN_DIR/data_report)")


def _add_convert(sub) -> None:
    p = _sub(
        sub,
        "convert",
        "HF dir / .gguf -> jaxtune checkpoint",
        "Convert a Hugging Face safetensors directory or a GGUF file into a jaxtune checkpoint "
        "(Orbax params, the resolved model config and the tokenizer). Weights are streamed "
        "tensor by tensor.",
    )
    p.add_argument("src", help="HF model directory (safetensors) or .gguf file")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="parameter dtype of the checkpoint (default: float32)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it is an earlier jaxtune export (anything else is never replaced)",
    )


def _add_export(sub) -> None:
    p = _sub(
        sub,
        "export",
        "run / checkpoint -> merged HF dir or PEFT adapter",
        "Export a trained model: --merged writes an HF safetensors directory with adapters "
        "folded in (transformers loads it); --adapter writes a PEFT LoRA/DoRA adapter (peft "
        "loads it on the base model). What is written is reloaded and its logits compared "
        "with the trained model before the command succeeds.",
    )
    p.add_argument("src", help="run dir, jaxtune checkpoint, HF dir or .gguf file")
    p.add_argument("out", help="output directory (written atomically)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--merged", action="store_true", help="HF directory with adapters merged (default)"
    )
    kind.add_argument("--adapter", action="store_true", help="PEFT adapter (LoRA / DoRA runs only)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weight dtype in the files (default: the parameters' dtype)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it is an earlier jaxtune export (anything else is never replaced)",
    )


def _add_generate(sub) -> None:
    p = _sub(
        sub,
        "generate",
        "generate text from a model",
        "Generate text with a KV cache (greedy by default; --temperature/--top-k/--top-p sample).",
    )
    p.add_argument(
        "--model", required=True, help="HF dir, .gguf file, jaxtune checkpoint or run dir"
    )
    p.add_argument(
        "--prompt", action="append", required=True, help="prompt text; repeat for a batch"
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument(
        "--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--chat", action="store_true", help="render the prompt with the tokenizer's chat template"
    )
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", default="float32", help="parameter dtype (default: float32)")


def build_parser() -> Parser:
    parser = Parser(
        prog="jaxtune",
        description="Fine-tune pretrained language models in JAX/Flax (full, LoRA, DoRA, adapters).",
        epilog="Run 'jaxtune COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands", parser_class=Parser
    )
    for add in (
        _add_train,
        _add_data,
        _add_convert,
        _add_export,
        _add_generate,
        _add_eval,
        _add_plan,
    ):
        add(sub)
    return parser


def cmd_convert(args) -> int:
    from jaxtune.api import convert

    t0 = time.perf_counter()
    out = convert(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote jaxtune checkpoint {out} ({time.perf_counter() - t0:.1f}s)")
    return 0


def cmd_export(args) -> int:
    from jaxtune.atomic import check_out_dir, overwriting
    from jaxtune.export.peft import export_adapter, export_merged
    from jaxtune.loading import from_pretrained, load_tokenizer, model_kind
    from jaxtune.resources import resolve_path

    src = resolve_path(args.src)
    check_out_dir(args.out, args.overwrite)  # refuse before loading anything
    if args.adapter and model_kind(src) != "run":
        from jaxtune.errors import ConfigError

        raise ConfigError(
            f"{src}: --adapter needs a training run directory (it holds the base model path)"
        )
    model = from_pretrained(src)
    from jaxtune.models.heads import SequenceClassifier

    if isinstance(model, SequenceClassifier):
        from jaxtune.errors import ConfigError
        from jaxtune.export.classifier import export_classifier

        if args.adapter:
            raise ConfigError(
                f"{src}: a classification run exports as a merged "
                "*ForSequenceClassification directory; use --merged"
            )
        with overwriting(args.overwrite):
            diff = export_classifier(model, args.out, tokenizer=load_tokenizer(src))
    elif args.adapter:
        from jaxtune.loading import run_model_source

        diff = export_adapter(model, args.out, run_model_source(src), overwrite=args.overwrite)
    else:
        tokenizer = load_tokenizer(src)
        diff = export_merged(
            model, args.out, tokenizer=tokenizer, dtype=args.dtype, overwrite=args.overwrite
        )
    print(f"wrote {args.out} (verified: max |logit diff| {diff:.2e})")
    return 0


def cmd_generate(args) -> int:
    from jaxtune.errors import ConfigError
    from jaxtune.eval.generate import SamplingConfig, generate_text
    from jaxtune.loading import from_pretrained, load_tokenizer
    from jaxtune.models import DTYPES

    # Every option is checked before a model is loaded.
    sampling = SamplingConfig(
        args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed
    ).check()
    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype: got {args.dtype!r}, expected one of {', '.join(DTYPES)}")
    model = from_pretrained(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    texts, stats = generate_text(
        model, tokenizer, args.prompt, sampling, chat=args.chat, stop=args.stop
    )
    for prompt, text in zip(args.prompt, texts, strict=True):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(text.strip())
    print(
        f"[{stats['tokens']} tokens, {stats['tokens_per_sec']:.1f} tokens/s incl. compile]",
        file=sys.stderr,
    )
    return 0


def cmd_train(args) -> int:
    from jaxtune.config import load_config
    from jaxtune.train.distributed import initialize_from_args
    from jaxtune.train.loop import train

    initialize_from_args(args)
    cfg = load_config(args.config, args.overrides)
    out = train(cfg)
    print(
        f"run dir: {out['run_dir']} ({out['steps']} steps, {out['seconds']:.0f}s, {out['stop_reason']})"
    )
    return 0


def cmd_data(args) -> int:
    from pathlib import Path

    from jaxtune.config import load_config
    from jaxtune.data import inspect_data
    from jaxtune.loading import load_tokenizer
    from jaxtune.train.run_dir import output_dir

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.run.dir) / "data_report"
    tok = load_tokenizer(cfg.model.path)
    # The default report goes into run.dir, marked as a jaxtune run directory so a later
    # `jaxtune train` starts there; a failure leaves no directory behind.
    with output_dir(out, run_dir=None if args.out else cfg.run.dir):
        inspect_data(
            cfg.data,
            tok,
            cfg.train.seq_len,
            out,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
        )
    print(f"report written to {out}")
    return 0


def cmd_eval(args) -> int:
    from jaxtune.eval.command import run

    return run(args)


def cmd_plan(args) -> int:
    from jaxtune.train.command import run_plan

    return run_plan(args)


COMMANDS = {
    "eval": cmd_eval,
    "plan": cmd_plan,
    "train": cmd_train,
    "data": cmd_data,
    "convert": cmd_convert,
    "export": cmd_export,
    "generate": cmd_generate,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse stops filling the ``overrides`` positional at the first option, so
    # ``plan cfg --topology v5e:1x1 train.batch_size=4`` would be refused: dotted
    # overrides that follow options are collected here instead.
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if not a.startswith("-") and "=" in a]
    if late and hasattr(args, "overrides"):
        args.overrides = [*(args.overrides or []), *late]
        extra = [a for a in extra if a not in late]
    if extra:
        parser.parse_args(argv)  # the usual message and exit code 2
    if args.version:
        from jaxtune import __version__

        print(f"jaxtune {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except JaxtuneError as e:
        if os.environ.get("JAXTUNE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
