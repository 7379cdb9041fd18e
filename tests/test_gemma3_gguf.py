"""The real Gemma 3 270M GGUF (Q4_K_M): jaxtune vs transformers' own GGUF loading.

The file ships as four chunk packages; ``resolve_path`` assembles it into the cache once.
"""

import subprocess
import sys

import numpy as np
import pytest

from jaxtune.errors import ConfigError
from jaxtune.resources import GEMMA3_270M_GGUF, assemble, resolve_path

TEXT = (
    "The quick brown fox jumps over the lazy dog. Machine learning models are trained on large "
    "datasets to recognise patterns. Paris is the capital of France, and Berlin is the capital "
    "of Germany. Water boils at 100 degrees Celsius at sea level. In 1969, astronauts landed on "
    "the Moon for the first time. Photosynthesis converts sunlight into chemical energy in plants. "
    "The Pacific Ocean is the largest ocean on Earth, covering about a third of its surface."
)


@pytest.fixture(scope="module")
def gemma3_gguf():
    return resolve_path(GEMMA3_270M_GGUF)


@pytest.fixture(scope="module")
def gemma3_tokenizer(gemma3_gguf):
    from jaxtune.api import load_tokenizer

    return load_tokenizer(gemma3_gguf)


def test_assemble_is_atomic_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTUNE_CACHE", str(tmp_path / "cache"))
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for i, p in enumerate(parts):
        p.write_bytes(bytes([i]) * (i + 1))
    sha = "0" * 64
    with pytest.raises(ConfigError, match="sha256"):
        assemble(parts, "pkg/x.bin", sha)
    assert not any((tmp_path / "cache").rglob("*.*"))  # nothing half-written is left behind
    out = assemble(parts, "pkg/x.bin")
    assert out == tmp_path / "cache" / "files" / "pkg" / "x.bin"
    assert out.read_bytes() == b"\x00\x01\x01\x02\x02\x02"
    with pytest.raises(ConfigError, match="missing"):
        assemble([tmp_path / "nope"], "pkg/y.bin")


@pytest.mark.slow
def test_config(gemma3_gguf):
    from jaxtune.gguf.load import read_gguf_config
    from jaxtune.hf.gemma import config_from_hf

    d = read_gguf_config(gemma3_gguf)
    assert d["model_type"] == "gemma3_text"
    cfg = config_from_hf(d, str(gemma3_gguf))
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (18, 640, 4, 1)
    assert (cfg.head_dim, cfg.vocab_size, cfg.query_pre_attn_scalar) == (256, 262144, 256)
    assert (cfg.rope_theta, cfg.rope_local_theta) == (1_000_000.0, 10_000.0)
    assert cfg.layer_windows == tuple(0 if i % 6 == 5 else 512 for i in range(18))
    assert cfg.tie_word_embeddings and cfg.qk_norm and cfg.sandwich_norms
    assert cfg.eos_token_id == (1, 106)  # <eos> and <end_of_turn>


@pytest.mark.slow
@pytest.mark.usefixtures("hf_gguf_parses_once")
def test_logits_and_tokenizer_match_transformers_gguf_load(gemma3_gguf, gemma3_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import jaxtune
    from jaxtune.eval.generate import render_prompt
    from jaxtune.verify import numpy_logits

    texts = [TEXT[k:] + " " + TEXT[:k] for k in (0, 120, 240, 360)]
    texts_extra = ["  two  spaces\tand a tab", "naïve café — 東京", "<start_of_turn>user\nhi"]
    ref_tok = AutoTokenizer.from_pretrained(str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name)
    for s in texts + texts_extra:
        assert gemma3_tokenizer(s)["input_ids"] == ref_tok(s)["input_ids"], s
    rows = gemma3_tokenizer(texts)["input_ids"]
    t = min(len(r) for r in rows)
    ids = np.asarray([r[:t] for r in rows], dtype=np.int64)

    model = jaxtune.from_pretrained(gemma3_gguf)
    out = numpy_logits(model, ids)
    ref_model = AutoModelForCausalLM.from_pretrained(
        str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.float().numpy()
    # A chat-rendered prompt exercises the turn tokens; greedy continuations must agree.
    prompt = render_prompt(gemma3_tokenizer, "What is the capital of France?", chat=True)
    chat = np.asarray([prompt], dtype=np.int64)
    chat_out = numpy_logits(model, chat)
    with torch.no_grad():
        chat_ref = ref_model(torch.tensor(chat)).logits.float().numpy()
    assert (chat_out.argmax(-1) == chat_ref.argmax(-1)).mean() >= 0.95
    assert np.abs(chat_out - chat_ref).max() < 1e-2
    n = ids.size
    agree = (out.argmax(-1) == ref.argmax(-1)).mean()
    diff = np.abs(out - ref).max()
    print(
        f"\nGemma 3 GGUF: {n} positions, top-1 agreement {agree:.4f}, max |logit diff| {diff:.2e}"
    )
    assert n >= 300
    assert agree >= 0.99
    assert diff < 1e-2


@pytest.mark.slow
def test_chat_template(gemma3_tokenizer):
    # The base 270M file has no chat template; the importer supplies Gemma 3's.
    rendered = gemma3_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert (
        rendered == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.slow
def test_generate_cli(gemma3_gguf):
    # This is the base (not instruction-tuned) 270M model: it answers a completion-style
    # question, while in chat form it repeats the question (transformers agrees, see above).
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxtune",
            "generate",
            "--model",
            GEMMA3_270M_GGUF,
            "--prompt",
            "Question: What is the capital of France?\nAnswer:",
            "--max-new-tokens",
            "8",
            "--stop",
            "\n",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Paris" in res.stdout
