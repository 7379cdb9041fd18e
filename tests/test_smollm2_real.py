"""The real SmolLM2-135M-Instruct GGUF: jaxtune vs transformers' own GGUF loading."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import jaxtune
from jaxtune.api import load_tokenizer
from jaxtune.eval.generate import SamplingConfig, generate_text
from jaxtune.verify import numpy_logits

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("hf_gguf_parses_once")]

TEXT = (
    "The quick brown fox jumps over the lazy dog. Machine learning models are trained on large "
    "datasets to recognise patterns. Paris is the capital of France, and Berlin is the capital "
    "of Germany. Water boils at 100 degrees Celsius at sea level. In 1969, astronauts landed on "
    "the Moon for the first time. Photosynthesis converts sunlight into chemical energy in plants. "
    "The Pacific Ocean is the largest ocean on Earth, covering about a third of its surface."
)


@pytest.fixture(scope="module")
def jax_model(smollm2_gguf):
    return jaxtune.from_pretrained(smollm2_gguf)


def test_logits_match_transformers_gguf_load(jax_model, smollm2_gguf):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(smollm2_gguf)
    rows = tok([TEXT[k:] + " " + TEXT[:k] for k in (0, 120, 240, 360)])["input_ids"]
    t = min(len(r) for r in rows)
    ids = np.asarray([r[:t] for r in rows], dtype=np.int64)
    ref_model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.float().numpy()
    out = numpy_logits(jax_model, ids)
    n = ids.size
    agree = (out.argmax(-1) == ref.argmax(-1)).mean()
    diff = np.abs(out - ref).max()
    print(
        f"\nSmolLM2 GGUF: {n} positions, top-1 agreement {agree:.4f}, max |logit diff| {diff:.2e}"
    )
    assert n >= 300
    assert agree >= 0.99
    assert diff < 1e-2


def test_generate_answers_a_chat_prompt(jax_model, smollm2_gguf):
    tok = load_tokenizer(smollm2_gguf)
    texts, stats = generate_text(
        jax_model,
        tok,
        ["What is the capital of France?"],
        SamplingConfig(max_new_tokens=24),
        chat=True,
    )
    assert "Paris" in texts[0]
    assert stats["tokens"] > 0


def test_generate_cli(smollm2_gguf):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxtune",
            "generate",
            "--model",
            str(smollm2_gguf),
            "--prompt",
            "Name the largest ocean on Earth.",
            "--chat",
            "--max-new-tokens",
            "24",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Pacific" in res.stdout
