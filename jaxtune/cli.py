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
            options = [o for a in self._actions for o in a.option_strings]
            for arg in m.group(1).split():
                flag = arg.split("=")[0]
                close = difflib.get_close_matches(flag, options, n=1)
                if flag.startswith("-") and close:
                    message += f". Did you mean '{close[0]}' for '{flag}'?"
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _sub(subparsers, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    epilog = f"example:\n  {EXAMPLES[name]}" if name in EXAMPLES else None
    return subparsers.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> Parser:
    parser = Parser(
        prog="jaxtune",
        description="Fine-tune pretrained language models in JAX/Flax (full, LoRA, DoRA, adapters).",
        epilog="Run 'jaxtune COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = _sub(
        sub,
        "convert",
        "HF dir / .gguf -> jaxtune checkpoint",
        "Convert a Hugging Face "
        "safetensors directory or a GGUF file into a jaxtune checkpoint (Orbax params, the "
        "resolved model config and the tokenizer). Weights are streamed tensor by tensor.",
    )
    p.add_argument("src", help="HF model directory (safetensors) or .gguf file")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="parameter dtype of the checkpoint (default: float32)",
    )

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
        "--prompt",
        action="append",
        required=True,
        help="prompt text; repeat for a batch of prompts",
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
    return parser


def cmd_convert(args) -> int:
    from jaxtune.api import convert

    t0 = time.perf_counter()
    out = convert(args.src, args.out, dtype=args.dtype)
    print(f"wrote jaxtune checkpoint {out} ({time.perf_counter() - t0:.1f}s)")
    return 0


def cmd_generate(args) -> int:
    from jaxtune.api import from_pretrained, load_tokenizer
    from jaxtune.eval.generate import SamplingConfig, generate_text

    model = from_pretrained(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    sampling = SamplingConfig(
        args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed
    )
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
    from jaxtune.train.loop import train

    cfg = load_config(args.config, args.overrides)
    out = train(cfg)
    print(
        f"run dir: {out['run_dir']} ({out['steps']} steps, {out['seconds']:.0f}s, {out['stop_reason']})"
    )
    return 0


def cmd_data(args) -> int:
    from pathlib import Path

    from jaxtune.api import load_tokenizer
    from jaxtune.config import load_config
    from jaxtune.data import inspect_data

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.run.dir) / "data_report"
    tok = load_tokenizer(cfg.model.path)
    inspect_data(
        cfg.data, tok, cfg.train.seq_len, out, batch_size=cfg.train.batch_size, seed=cfg.train.seed
    )
    print(f"report written to {out}")
    return 0


COMMANDS = {"train": cmd_train, "data": cmd_data, "convert": cmd_convert, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
