"""PEFT exports: merged HF dir and PEFT adapter, checked against transformers + peft."""

import json

import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers
from flax import nnx
from helpers import perturb, torch_logits, train

import jaxtune
from jaxtune.config import OptimConfig, PeftConfig
from jaxtune.errors import ConfigError, ExportError
from jaxtune.export.peft import export_adapter, export_merged, load_peft_adapter
from jaxtune.peft import apply_peft
from jaxtune.verify import numpy_logits

VOCAB = 256  # LlamaConfig.tiny's vocab: helpers.TRAIN_IDS are drawn from it


def hf_llama(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
    )
    out = tmp_path / "base"
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def adapted(base, peft_cfg, scan=True, steps=3):
    """Base + PEFT, trained ``steps`` steps (0: factors perturbed instead, to save a compile)."""
    model = jaxtune.from_pretrained(base, scan_layers=scan)
    apply_peft(model, peft_cfg, nnx.Rngs(0))
    if steps:
        optim = OptimConfig(lr=3e-2, schedule="constant")
        _, trainable, _ = train(model, peft_cfg, steps=steps, optim=optim)
        nnx.update(model, trainable)
    else:
        perturb(model)
    return model


CASES = {  # (peft config, scan_layers, train steps)
    "lora": (PeftConfig(method="lora", rank=4, alpha=8.0, targets=("all-linear",)), True, 3),
    "dora_rslora": (
        PeftConfig(method="dora", rank=4, alpha=8.0, rslora=True, targets=("q_proj", "down_proj")),
        True,
        3,
    ),
    # Unscanned, one layer only: target_modules becomes an exact regex.
    "lora_one_layer": (
        PeftConfig(method="lora", rank=2, alpha=4.0, targets=("layers/1/attn/o_proj",)),
        False,
        0,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exports_load_in_transformers_and_peft(case, tmp_path):
    peft_cfg, scan, steps = CASES[case]
    base = hf_llama(tmp_path)
    model = adapted(base, peft_cfg, scan, steps)
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 10))
    ours = numpy_logits(model, ids)

    merged_dir = tmp_path / "merged"
    assert export_merged(model, merged_dir) <= 1e-4
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert np.abs(torch_logits(hf, ids) - ours).max() <= 1e-4

    adapter_dir = tmp_path / "adapter"
    assert export_adapter(model, adapter_dir, base) <= 1e-4
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] == (peft_cfg.method == "dora")
    assert cfg["use_rslora"] == peft_cfg.rslora and cfg["r"] == peft_cfg.rank
    assert isinstance(cfg["target_modules"], str if case == "lora_one_layer" else list)
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(base)
    pm = hf_peft.PeftModel.from_pretrained(torch_base, adapter_dir).eval()
    assert np.abs(torch_logits(pm, ids) - ours).max() <= 1e-4

    # And back: base + imported adapter gives the in-memory model's logits exactly.
    again = load_peft_adapter(jaxtune.from_pretrained(base, scan_layers=scan), adapter_dir)
    assert np.array_equal(numpy_logits(again, ids), ours)


def test_peft_trained_adapter_imports_and_reexports(tmp_path):
    base = hf_llama(tmp_path)
    torch.manual_seed(1)
    cfg = hf_peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["k_proj", "gate_proj"], use_dora=True
    )
    pm = hf_peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base), cfg)
    with torch.no_grad():  # as if trained: B (and magnitudes) away from their init
        for name, p in pm.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "torch_adapter")
    ids = np.random.RandomState(2).randint(0, VOCAB, (2, 10))
    ref = torch_logits(pm.eval(), ids)
    model = load_peft_adapter(jaxtune.from_pretrained(base), tmp_path / "torch_adapter")
    assert np.abs(numpy_logits(model, ids) - ref).max() <= 1e-4
    # Continue from it: re-export lands in the same dir layout PEFT reads.
    assert export_adapter(model, tmp_path / "again", base) <= 1e-4


def test_failed_verification_writes_nothing(tmp_path):
    base = hf_llama(tmp_path)
    model = adapted(base, PeftConfig(method="lora", rank=2, alpha=4.0), steps=0)
    # As if trained with peft.unfreeze=norms.
    model.norm.scale.set_value(model.norm.scale[...] * 1.5)
    out = tmp_path / "adapter"
    # Trained norm scales are not part of a LoRA adapter: the reload differs.
    with pytest.raises(ExportError, match="export --merged"):
        export_adapter(model, out, base)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # The merged export carries them and verifies.
    assert export_merged(model, tmp_path / "merged") <= 1e-4


def test_adapter_method_export_is_config_error(tmp_path):
    base = hf_llama(tmp_path)
    model = jaxtune.from_pretrained(base)
    apply_peft(model, PeftConfig(method="adapter"), nnx.Rngs(0))
    with pytest.raises(ConfigError, match="jaxtune checkpoint") as e:
        export_adapter(model, tmp_path / "out", base)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="jaxtune checkpoint"):
        export_merged(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
