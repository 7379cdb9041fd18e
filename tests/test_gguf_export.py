"""GGUF export: transformers' own GGUF loader reads what jaxtune writes with the trained logits.

The reference is the user's client: ``AutoModelForCausalLM.from_pretrained(dir,
gguf_file=...)`` (torch) and ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` must give
the jaxtune model's logits (adapters unmerged) and the original tokenizer's ids. llama.cpp
itself is checked by ``make test-llamacpp`` (tests/llamacpp/).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from flax import nnx
from helpers import perturb

from jaxtune.cli import main
from jaxtune.cli.parsers import GGUF_TYPE_NAMES
from jaxtune.errors import ConfigError, ExportError
from jaxtune.export.gguf import PROBE_TEXTS, export_gguf
from jaxtune.gguf.load import read_gguf_config
from jaxtune.gguf.reader import GGUFFile
from jaxtune.gguf.writer import GGUF_TYPES
from jaxtune.loading import from_pretrained, load_tokenizer
from jaxtune.peft import add_lora
from jaxtune.verify import numpy_logits

LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# transformers reads each exported file three times (tokenizer, config, weights): parse once.
pytestmark = pytest.mark.usefixtures("hf_gguf_parses_once")
CORPUS = [*PROBE_TEXTS, *(f"hello world, this is test sentence number {i}." for i in range(200))]
TEXTS = [*PROBE_TEXTS, "What is 2 + 2? Four.", "unseen: Zebra quartz vexing jumps"]


QWEN2_SPLIT = LLAMA3_SPLIT.replace("\\p{N}{1,3}", "\\p{N}")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen2_tokenizer():
    """A small real byte-level BPE with Qwen2's pre-tokenizer, no BOS, ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=_regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


def llama3_tokenizer():
    """A small real byte-level BPE with Llama 3's pre-tokenizer, BOS and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>"]
    specials += ["<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=_regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        chat_template=LLAMA3_TEMPLATE,
    )


def _regex(pattern: str):
    from tokenizers import Regex

    return Regex(pattern)


def spm_dir(path, gemma: bool):
    """A real sentencepiece BPE model (byte fallback) trained here, saved as ``tokenizer.model``
    with its HF tokenizer: Gemma's (no dummy prefix, turn tokens) or Llama 2's."""
    import sentencepiece as spm
    import transformers

    buf = io.BytesIO()
    extra = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3) if gemma else {}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=not gemma,
        split_digits=True,
        character_coverage=1.0,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"] if gemma else [],
        minloglevel=2,
        **extra,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    cls = transformers.GemmaTokenizer if gemma else transformers.LlamaTokenizer
    tok = cls.from_pretrained(str(path), add_bos_token=True)
    if gemma:
        from jaxtune.gguf.gemma import CHAT_TEMPLATE

        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(path))
    return tok


def hf_tiny(kind: str, path, vocab: int, **over):
    """A tiny random HF model saved with save_pretrained (torch); returns its dir."""
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
    )
    if kind in ("llama", "mistral", "qwen2"):
        llama = dict(num_hidden_layers=2, head_dim=16, rope_theta=5e5)
        config, causal_lm = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        }[kind]
        model = causal_lm(config(**{**common, **llama, **over}))
    else:  # gemma3: llama.cpp's fixed facts (1/sqrt(head_dim) scale, every 6th layer global)
        common.update(num_attention_heads=2, num_key_value_heads=1)
        gemma = dict(num_hidden_layers=6, head_dim=256, query_pre_attn_scalar=256, sliding_window=8)
        cfg = transformers.Gemma3TextConfig(**{**common, **gemma, **over})
        model = transformers.Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def with_lora(path):
    model = from_pretrained(path)
    add_lora(model, "all-linear", rank=4, alpha=8, rngs=nnx.Rngs(0))
    perturb(model)
    return model


def probe(tokenizer, texts=TEXTS):
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def hf_gguf_logits(out, name, ids, mask):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), gguf_file=name, dtype=torch.float32
    )
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        logits = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    return logits.numpy()


def check_transformers_reads(report, model, tokenizer, atol=1e-4):
    """transformers' GGUF loader: same logits as ``model``, same ids as ``tokenizer``."""
    from transformers import AutoTokenizer

    out, name = report.path.parent, report.path.name
    read = AutoTokenizer.from_pretrained(str(out), gguf_file=name)
    for text in TEXTS:
        assert read(text)["input_ids"] == tokenizer(text)["input_ids"], text
    ids, mask = probe(tokenizer)
    ref = numpy_logits(model, ids, mask)
    got = hf_gguf_logits(out, name, ids, mask)
    keep = mask.astype(bool)
    assert np.abs(ref[keep] - got[keep]).max() <= atol * max(1.0, np.abs(ref[keep]).max())
    return got


def test_type_names_match_the_writer():
    assert GGUF_TYPE_NAMES == tuple(GGUF_TYPES)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_gqa_f32_loads_in_transformers(tmp_path, tied):
    tok = llama3_tokenizer()
    src = hf_tiny("llama", tmp_path / "base", len(tok), tie_word_embeddings=tied)
    tok.save_pretrained(str(src))
    model = with_lora(src)
    report = export_gguf(model, tmp_path / "out", tokenizer=tok, source=str(src), progress=False)
    assert report.max_logit_diff <= 1e-4 and report.top1 == 1.0
    check_transformers_reads(report, model, tok)
    f = GGUFFile(report.path)
    assert f.get("general.architecture") == "llama"
    assert f.get("tokenizer.ggml.model") == "gpt2" and f.get("tokenizer.ggml.pre") == "llama-bpe"
    assert f.get("tokenizer.chat_template") == LLAMA3_TEMPLATE
    assert f.get("tokenizer.ggml.eot_token_id") == tok.convert_tokens_to_ids("<|eot_id|>")
    assert f.get("tokenizer.ggml.add_bos_token") is True
    assert ("output.weight" in {t.name for t in f.tensors}) is not tied
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["Modelfile", "jaxtune_export.json", report.path.name]
    )


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_mistral_and_qwen2_f32_load_in_transformers(tmp_path, family):
    """Mistral is llama.cpp's ``llama`` (q/k permuted); Qwen2 its ``qwen2`` (rows as HF has
    them, q/k/v biases, Qwen2's pre-tokenizer, no BOS)."""
    tok = qwen2_tokenizer() if family == "qwen2" else llama3_tokenizer()
    src = hf_tiny(family, tmp_path / "base", len(tok))
    tok.save_pretrained(str(src))
    model = with_lora(src)
    report = export_gguf(model, tmp_path / "out", tokenizer=tok, source=str(src), progress=False)
    check_transformers_reads(report, model, tok)
    f = GGUFFile(report.path)
    assert f.get("general.architecture") == ("qwen2" if family == "qwen2" else "llama")
    if family == "qwen2":
        assert f.get("tokenizer.ggml.pre") == "qwen2"
        assert "blk.1.attn_k.bias" in {t.name for t in f.tensors}
        assert f.get("tokenizer.ggml.add_bos_token") is False


def test_llama3_rope_scaling_is_written_as_rope_freqs(tmp_path):
    """Llama 3.1's rope scaling becomes llama.cpp's rope_freqs tensor; jaxtune's importer
    recovers the same parameters from it (the export's own check compares the logits)."""
    tok = llama3_tokenizer()
    rope = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    # head_dim 64: enough frequencies in the smoothed band to pin the parameters down.
    src = hf_tiny("llama", tmp_path / "base", len(tok), rope_parameters=rope, head_dim=64)
    tok.save_pretrained(str(src))
    report = export_gguf(
        with_lora(src), tmp_path / "out", tokenizer=tok, source=str(src), progress=False
    )
    assert report.max_logit_diff <= 1e-4
    assert "rope_freqs.weight" in {t.name for t in GGUFFile(report.path).tensors}
    assert read_gguf_config(report.path)["rope_parameters"] == rope


def test_llama2_sentencepiece_tokenizer(tmp_path):
    """A sentencepiece tokenizer goes in as llama.cpp's ``llama`` model: scores and types
    from tokenizer.model, the space prefix, byte tokens."""
    tok = spm_dir(tmp_path / "base", gemma=False)
    src = hf_tiny("llama", tmp_path / "base", len(tok))
    model = with_lora(src)
    report = export_gguf(model, tmp_path / "out", tokenizer=tok, source=str(src), progress=False)
    check_transformers_reads(report, model, tok)
    f = GGUFFile(report.path)
    assert f.get("tokenizer.ggml.model") == "llama"
    assert f.get("tokenizer.ggml.add_space_prefix") is True
    types = f.get("tokenizer.ggml.token_type")
    assert list(types).count(6) == 256  # BYTE: <0x00>..<0xFF>


def test_gemma3_f32_loads_in_transformers(tmp_path):
    tok = spm_dir(tmp_path / "base", gemma=True)
    src = hf_tiny("gemma3", tmp_path / "base", len(tok))
    model = with_lora(src)
    report = export_gguf(model, tmp_path / "out", tokenizer=tok, source=str(src), progress=False)
    assert report.max_logit_diff <= 1e-4
    check_transformers_reads(report, model, tok)
    f = GGUFFile(report.path)
    assert f.get("general.architecture") == "gemma3"
    assert f.get("gemma3.attention.sliding_window") == 8
    assert f.get("tokenizer.ggml.add_space_prefix") is False
    assert f.get("tokenizer.ggml.eot_token_id") == tok.convert_tokens_to_ids("<end_of_turn>")
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile


def test_gemma3_config_llama_cpp_cannot_run_is_refused(tmp_path):
    tok = spm_dir(tmp_path / "base", gemma=True)
    src = hf_tiny("gemma3", tmp_path / "base", len(tok), query_pre_attn_scalar=128)
    with pytest.raises(ConfigError, match="query_pre_attn_scalar 128"):
        export_gguf(from_pretrained(src), tmp_path / "out", tokenizer=tok, progress=False)
    assert not (tmp_path / "out").exists()


def test_quantized_types_and_the_floor(tmp_path):
    """Small types keep norms f32 and embeddings/output Q8_0; rows the block size does
    not divide fall back to F16; a file below the top-1 floor is refused, leaving nothing."""
    tok = llama3_tokenizer()
    src = hf_tiny("llama", tmp_path / "base", len(tok), intermediate_size=80)
    tok.save_pretrained(str(src))
    model = with_lora(src)
    report = export_gguf(
        model, tmp_path / "q4", tokenizer=tok, source=str(src), kind="q4_0", progress=False
    )
    types = {t.name: t.tensor_type.name for t in GGUFFile(report.path).tensors}
    assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q4_0"
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 80: not a multiple of 32
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert 0 < report.max_logit_diff and 0 <= report.top1 <= 1
    with pytest.raises(ExportError, match="top-1 agreement"):
        export_gguf(
            model, tmp_path / "refused", tokenizer=tok, source=str(src), kind="q4_0",
            min_top1=1.01, progress=False,
        )  # fmt: skip
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_smollm2_lora_export_loads_in_transformers(tmp_path, smollm2_gguf):
    """The real SmolLM2 (GGUF base) with a non-zero LoRA: f32 in transformers with the
    trained logits; its tokenizer metadata (smollm pre-tokenizer) copied from the base."""
    model = with_lora(smollm2_gguf)
    tok = load_tokenizer(smollm2_gguf)
    report = export_gguf(model, tmp_path / "f32", tokenizer=tok, progress=False)
    assert report.path.name == "SmolLM2-135M-Instruct-F32.gguf"
    check_transformers_reads(report, model, tok, atol=2e-5)
    f = GGUFFile(report.path)
    assert f.get("tokenizer.ggml.pre") == "smollm"
    assert f.get("tokenizer.ggml.eot_token_id") == tok.convert_tokens_to_ids("<|im_end|>")
    q8 = export_gguf(model, tmp_path / "q8", tokenizer=tok, kind="q8_0", progress=False)
    assert q8.top1 >= 0.9 and q8.bytes < 0.3 * report.bytes


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A finished 2-step LoRA run (`jaxtune train`) of a tiny Llama with a Llama 3 tokenizer."""
    from jaxtune.train.testing import write_config, write_reverse_data

    root = tmp_path_factory.mktemp("bpe_run")
    tok = llama3_tokenizer()
    src = hf_tiny("llama", root / "model", len(tok))
    tok.save_pretrained(str(src))
    data = write_reverse_data(root / "data.jsonl", n=16)
    cfg = write_config(
        root / "run.yaml",
        src,
        data,
        root / "run",
        data=f"{{train: {data}, format: instruction, template: plain, length_buckets: [128]}}",
        train="{steps: 2, batch_size: 8, seq_len: 128}",
        checkpoint="{every: 0, async_save: false}",
    )
    assert main(["train", str(cfg)]) == 0
    return root / "run"


def test_cli_exports_a_run(bpe_run, tmp_path):
    out = tmp_path / "gguf"
    assert main(["export", str(bpe_run), str(out), "--gguf", "--gguf-type", "f16"]) == 0
    (path,) = out.glob("*.gguf")
    assert path.name == "run-F16.gguf"
    f = GGUFFile(path)
    assert f.get("general.finetune") == "lora-sft" and f.get("general.file_type") == 1
    marker = json.loads((out / "jaxtune_export.json").read_text())
    assert sorted(marker["files"]) == ["Modelfile", "run-F16.gguf"]
    # The run trained on the plain text template ("{instruction}\n" + response + EOS): the
    # file's chat template and the Modelfile speak that, not the tokenizer's chat format.
    read = load_tokenizer(path)
    chat = [{"role": "user", "content": "Reverse: a b"}, {"role": "assistant", "content": "b a"}]
    assert read.apply_chat_template(chat, tokenize=False) == "Reverse: a b\nb a<|end_of_text|>"
    modelfile = (out / "Modelfile").read_text()
    assert 'TEMPLATE """{{ .Prompt }}\n{{ .Response }}<|end_of_text|>"""' in modelfile
    assert 'PARAMETER stop "<|end_of_text|>"' in modelfile
    # A second export into the same directory needs --overwrite; a foreign file blocks it.
    assert main(["export", str(bpe_run), str(out), "--gguf"]) != 0
    assert main(["export", str(bpe_run), str(out), "--gguf", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.gguf")) == ["run-F32.gguf"]
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(bpe_run), str(out), "--gguf", "--overwrite"]) != 0
    assert (out / "notes.txt").read_text() == "mine"


def test_tokenizer_llama_cpp_cannot_run_is_refused(tiny_run, tmp_path, capsys):
    """tiny_run's word-level tokenizer has no llama.cpp form: one line, nothing written."""
    assert main(["export", str(tiny_run["run"]), str(tmp_path / "o"), "--gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: GGUF export: the tokenizer cannot be written: tokenizer model 'WordLevel' "
        "has no llama.cpp form here"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("template", ["alpaca", "Review: {instruction}\nSentiment:"])
def test_prompt_chat_template_renders_the_trained_prompt(template):
    """A user turn renders exactly as the encoder's prompt; an assistant turn + EOS."""
    from jaxtune.data.config import DataConfig
    from jaxtune.data.formats import PromptResponseEncoder, prompt_chat_template
    from jaxtune.data.loaders import Record

    tok = llama3_tokenizer()
    cfg = DataConfig(train="x.jsonl", format="instruction", template=template)
    prompt, _ = PromptResponseEncoder(cfg, tok).prompt_response(
        Record("x.jsonl:1", 0, {"instruction": "a {{ braced }} film", "output": "pos"})
    )
    tok.chat_template = prompt_chat_template(cfg)
    chat = [
        {"role": "user", "content": "a {{ braced }} film"},
        {"role": "assistant", "content": "pos"},
    ]
    assert tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True) == prompt
    assert tok.apply_chat_template(chat, tokenize=False) == prompt + "pos<|end_of_text|>"
    assert prompt_chat_template(DataConfig(train="x.jsonl", format="chat")) is None


def test_cli_refuses_bad_options(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", str(tiny_run["run"]), str(tmp_path / "o"), "--gguf", "--gguf-type", "q3"])
    assert main(["export", str(tiny_run["run"]), str(tmp_path / "o"), "--gguf-type", "q8_0"]) != 0
    assert "--gguf-type and --min-top1 go with --gguf" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
