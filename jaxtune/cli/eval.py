"""``jaxtune eval``: evaluate a model (or a model before and after fine-tuning) on tasks.

::

    jaxtune eval --model PATH --tasks arc_easy,mmlu,my_task.jsonl --out DIR \\
        [--limit N] [--num-fewshot K] [--batch-size B] [--compare BASE]
    jaxtune eval CONFIG.yaml [key=value ...] [--compare]   # eval.tasks, run.dir, data.*

PATH / BASE: an HF directory, a ``.gguf`` file, a jaxtune checkpoint or a run directory
(latest checkpoint with its adapters). With a config the model is the run in ``run.dir``
when it has checkpoints (else ``model.path``), the tasks are ``eval.tasks`` and
``--compare`` without a value compares against ``model.path``. ``perplexity`` is scored
on ``data.validation`` (``--split``) or on ``--data FILE``.

Writes ``DIR/eval_report.json`` (``{task: {metric: value}}``), ``DIR/eval_report.md``
(one table; before / after columns with ``--compare``), ``DIR/eval_meta.json`` and
per-item predictions under ``DIR/predictions/``. ``--lm-eval TASKS`` (with or without
``--tasks``) also runs lm-evaluation-harness tasks through its ``jaxtune`` backend
(:mod:`jaxtune.eval.harness`, the ``lmeval`` extra) and writes lm-eval's
``DIR/lm_eval_results.json`` and ``DIR/lm_eval_samples/``; their metrics join the report
as ``lm_eval/<task>``. With ``eval.decontaminate: true`` in the
config, each multiple-choice task is also scored on its items that share no 13-gram with
the config's training split (``{task}/clean``), and ``DIR/contamination.json`` lists the
others.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from pathlib import Path

from jaxtune.config import load_config
from jaxtune.data import DataConfig, build_datasets
from jaxtune.data.contamination import record_texts
from jaxtune.data.splits import load_split
from jaxtune.errors import ConfigError, DataError
from jaxtune.eval.bias_probe import load_probe
from jaxtune.eval.contamination import clean_masks
from jaxtune.eval.generate import SamplingConfig
from jaxtune.eval.report import compare_table, markdown_table, write_report
from jaxtune.eval.runner import (
    file_task_kind,
    parse_tasks,
    probe_source,
    read_generation_task,
    run_tasks,
)
from jaxtune.eval.tasks import is_file_task, read_jsonl_task
from jaxtune.loading import from_pretrained, load_tokenizer, model_kind, run_has_checkpoint
from jaxtune.models import DTYPES
from jaxtune.peft import has_adapters, has_lora, merged_copy
from jaxtune.resources import resolve_path


def _positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")


def _plan(args) -> dict:
    """Resolves model, base, tasks, output dir and perplexity data from flags and config."""
    config, overrides = args.config, list(args.overrides or [])
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    cfg = None
    if config or overrides:
        cfg = load_config(config, overrides)
    plan = {"cfg": cfg, "model": args.model, "tasks": args.tasks, "out": args.out}
    plan["limit"] = args.limit
    plan["base"] = args.compare or None
    plan["max_new_tokens"] = args.max_new_tokens
    plan["seq_len"] = args.seq_len or 512
    if cfg is not None:
        run_dir = Path(cfg.run.dir)
        # A run that has not saved a checkpoint yet: evaluate its base model.
        is_run = run_dir.is_dir() and model_kind(run_dir) == "run" and run_has_checkpoint(run_dir)
        plan["model"] = plan["model"] or (str(run_dir) if is_run else cfg.model.path)
        plan["tasks"] = plan["tasks"] or ",".join(cfg.eval.tasks)
        plan["limit"] = plan["limit"] or cfg.eval.max_items
        plan["out"] = plan["out"] or str(run_dir / "eval")
        plan["max_new_tokens"] = plan["max_new_tokens"] or cfg.eval.max_new_tokens
        plan["seq_len"] = args.seq_len or cfg.train.seq_len
        if args.compare == "":
            if not cfg.model.path:
                raise ConfigError("--compare without BASE needs model.path in the config")
            plan["base"] = cfg.model.path
        if plan["model"] and not resolve_path(plan["model"]).exists():
            raise ConfigError(f"model {plan['model']}: no such file or directory")
    elif args.compare == "":
        raise ConfigError("--compare needs a BASE model path (or a config with model.path)")
    if not plan["model"]:
        raise ConfigError("no model: pass --model PATH (or a config with model.path / run.dir)")
    if not plan["tasks"] and not args.lm_eval:
        raise ConfigError("no tasks: pass --tasks a,b,file.jsonl (or eval.tasks in a config)")
    plan["out"] = plan["out"] or "eval_out"
    plan["max_new_tokens"] = plan["max_new_tokens"] or 64
    return plan


def _eval_data(args, plan, tokenizer):
    """The tokenized split for ``perplexity``, or None when it is not requested."""
    cfg = plan["cfg"]
    if args.data:
        data_cfg = DataConfig(train=args.data, format=args.data_format, shuffle=False)
        split = "train"
    elif cfg is not None:
        data_cfg = cfg.data
        split = args.split or ("validation" if not cfg.data.test or cfg.data.validation else "test")
    else:
        return None
    sets = build_datasets(data_cfg, tokenizer, plan["seq_len"], splits=(split,))
    if split not in sets:
        raise DataError(f"data.{split} has no data for the perplexity task")
    return sets[split]


def _evaluate(path: str, args, plan, names: list[str], say) -> dict:
    t0 = time.perf_counter()
    model = from_pretrained(path, dtype=args.dtype)
    tokenizer = load_tokenizer(path)
    if has_lora(model) and not has_adapters(model):
        # A run loads with its LoRA factors unmerged; folding them in once (exact, the
        # tests check merged == unmerged) makes every scored forward pass cheaper.
        model = merged_copy(model)
    say(f"loaded {path} ({time.perf_counter() - t0:.1f}s)")
    eval_data = _eval_data(args, plan, tokenizer) if "perplexity" in names else None
    sampling = SamplingConfig(
        plan["max_new_tokens"], args.temperature, args.top_k, args.top_p, args.seed
    )
    return run_tasks(
        model,
        tokenizer,
        names,
        limit=plan["limit"],
        num_fewshot=args.num_fewshot or 0,
        seed=args.seed,
        batch_size=args.batch_size,
        max_len=args.max_len,
        eval_data=eval_data,
        sampling=sampling,
        chat=args.chat,
        stop=args.stop,
        out_dir=plan["out_model"],
        log=say,
        progress=True,
        clean=plan["clean"],
    )


def _decontamination(plan, names: list[str], say) -> dict | None:
    """``eval.decontaminate``: the clean-item masks (and their report), else None."""
    cfg = plan["cfg"]
    if cfg is None or not cfg.eval.decontaminate:
        return None
    train = load_split(cfg.data, "train")
    if train is None:
        raise ConfigError("eval.decontaminate needs the training data: set data.train")
    masks, reports = clean_masks(names, record_texts(train), limit=plan["limit"])
    for task, c in reports.items():
        say(
            f"decontaminate {task}: {c['contaminated']} of {c['items']} items share a "
            f"{c['n']}-gram with the training data"
        )
    plan["contamination"] = reports
    return masks


def _lm_eval(args, plan, say) -> dict:
    """``--lm-eval``: lm-eval's tasks through the ``jaxtune`` backend; ``{lm_eval/task: ..}``."""
    # By name and only here (as the CLI loads its command modules): the backend imports
    # lm_eval, an optional extra, which `jaxtune eval` without --lm-eval must not need.
    run_lm_eval = importlib.import_module("jaxtune.eval.harness_run").run_lm_eval

    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    say(f"== lm-eval: {', '.join(tasks)} on {plan['model']}")
    model_args = {"pretrained": plan["model"], "dtype": args.dtype, "batch_size": args.batch_size}
    if args.max_len:
        model_args["max_length"] = args.max_len
    results = run_lm_eval(
        model_args,
        tasks,
        plan["out"],
        limit=plan["limit"],
        num_fewshot=args.num_fewshot,
        include_path=args.include_path,
        seed=args.seed,
    )
    say(f"lm-eval results: {Path(plan['out']) / 'lm_eval_results.json'}")
    return {f"lm_eval/{task}": metrics for task, metrics in results.items()}


def _check_lm_eval(args, plan) -> None:
    """``--lm-eval`` needs the extra; refused before any model is loaded."""
    if not args.lm_eval:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            '--lm-eval needs lm-evaluation-harness: pip install "jaxtune[lmeval]" '
            '(or pip install "lm_eval>=0.4.13,<0.5")'
        )
    if plan["base"]:
        raise ConfigError("--lm-eval evaluates one model: drop --compare")
    model_kind(resolve_path(plan["model"]))  # a missing path fails now, not after indexing
    if args.include_path and not Path(args.include_path).is_dir():
        raise ConfigError(f"--include-path {args.include_path}: no such directory")


def run(args) -> int:
    """Runs ``jaxtune eval``; user errors raise ``JaxtuneError`` (the CLI prints one line)."""
    for name in ("--limit", "--batch-size", "--max-len", "--max-new-tokens", "--seq-len"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    SamplingConfig(args.max_new_tokens or 64, args.temperature, args.top_k, args.top_p).check()
    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype: got {args.dtype!r}, expected one of {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    plan = _plan(args)
    _check_lm_eval(args, plan)
    names = parse_tasks(plan["tasks"]) if plan["tasks"] else []
    # Validate user task files completely before any model is loaded.
    for n in names:
        if (source := probe_source(n)) is not None:
            load_probe(source)
        elif n != "perplexity" and is_file_task(n):
            (read_generation_task if file_task_kind(n) == "generate" else read_jsonl_task)(n)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # Before any model is loaded: a missing training file fails in a second.
    plan["clean"] = _decontamination(plan, names, say)
    out = Path(plan["out"])
    base = None
    if plan["base"]:
        say(f"== base model: {plan['base']}")
        plan["out_model"] = out / "base"
        base = _evaluate(plan["base"], args, plan, names, say)
    plan["out_model"] = out
    results = {}
    if names:
        say(f"== model: {plan['model']}")
        results = _evaluate(plan["model"], args, plan, names, say)
    if args.lm_eval:
        results.update(_lm_eval(args, plan, say))
    meta = {
        "model": plan["model"],
        "base_model": plan["base"],
        "tasks": names
        + ([f"lm_eval/{t}" for t in args.lm_eval.split(",")] if args.lm_eval else []),
        "num_fewshot": args.num_fewshot if args.lm_eval else args.num_fewshot or 0,
        "limit": plan["limit"],
        "seed": args.seed,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    paths = write_report(
        out, results, base=base, meta=meta, contamination=plan.get("contamination")
    )
    print(compare_table(base, results) if base is not None else markdown_table(results))
    print(f"report: {paths['json']} and {paths['md']}")
    return 0
