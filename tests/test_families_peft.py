"""LoRA / DoRA / adapters, exports and the trainer on every non-Llama family.

Nothing here is family-specific on the jaxtune side: the same ``apply_peft``,
``export_merged`` / ``export_adapter`` and trainer run on Gemma 1/2/3, GPT-2 (Conv1D
weights, fused ``c_attn``) and GPT-Neo; transformers + peft are the reference.
"""

import json

import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers
from flax import nnx
from helpers import changed_paths, hf_gemma, hf_gpt2, perturb, torch_logits, train

import jaxtune
from jaxtune.config import OptimConfig, PeftConfig, load_config
from jaxtune.export.peft import export_adapter, export_merged, load_peft_adapter
from jaxtune.peft import AdapterParam, apply_peft
from jaxtune.train import testing as T
from jaxtune.train.loop import train as run_training
from jaxtune.verify import numpy_logits

VOCAB = 256  # helpers.TRAIN_IDS are drawn from 256 tokens


def base_model(family, tmp_path, vocab=VOCAB):
    """(HF dir, torch-loading function) of a tiny random model of ``family``."""
    if family.startswith("gemma"):
        over = {"gemma2": dict(sliding_window=5, num_hidden_layers=2)}.get(family, {})
        if family == "gemma3":
            over = dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"])
        path, _ = hf_gemma(family, tmp_path, vocab=vocab, num_key_value_heads=2, **over)
    else:
        path, _ = hf_gpt2(family, tmp_path, vocab=vocab)
    return path


def load_torch(path):
    # Eager attention: HF's reference math (and the only one that soft-caps Gemma 2).
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager"
    ).eval()


CASES = {  # family: (peft config, scan_layers, train steps (0 = perturbed factors))
    "gemma": (PeftConfig(method="lora", rank=4, alpha=8.0, targets=("all-linear",)), True, 0),
    "gemma2": (
        PeftConfig(method="dora", rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")),
        False,
        0,
    ),
    "gemma3": (PeftConfig(method="lora", rank=4, alpha=8.0, targets=("all-linear",)), True, 1),
    # PEFT's default target for GPT-2 is the fused c_attn (a Conv1D); DoRA on Conv1D
    # also checks the magnitude's orientation. LoRA on Conv1D: the PEFT import below.
    "gpt2": (PeftConfig(method="dora", rank=4, alpha=8.0, targets=("c_attn", "c_fc")), False, 0),
    "gpt_neo": (
        PeftConfig(method="lora", rank=4, alpha=8.0, rslora=True, targets=("q_proj", "v_proj")),
        True,
        0,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exports_load_in_transformers_and_peft(case, tmp_path):
    family = case
    peft_cfg, scan, steps = CASES[case]
    base = base_model(family, tmp_path)
    model = jaxtune.from_pretrained(base, scan_layers=scan)
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 10))
    base_logits = numpy_logits(model, ids)
    apply_peft(model, peft_cfg, nnx.Rngs(0))
    assert np.abs(numpy_logits(model, ids) - base_logits).max() <= 1e-5  # LoRA at init == base
    if steps:
        optim = OptimConfig(lr=3e-2, schedule="constant")
        _, trainable, _ = train(model, peft_cfg, steps=steps, optim=optim)
        nnx.update(model, trainable)
    else:
        perturb(model)
    ours = numpy_logits(model, ids)
    assert np.abs(ours - base_logits).max() > 1e-2  # the adapter does something

    merged_dir = tmp_path / "merged"
    assert export_merged(model, merged_dir) <= 1e-4
    assert np.abs(torch_logits(load_torch(merged_dir), ids) - ours).max() <= 1e-4

    adapter_dir = tmp_path / "adapter"
    assert export_adapter(model, adapter_dir, base) <= 1e-4
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert acfg["fan_in_fan_out"] == (family == "gpt2")  # Conv1D weights are [in, out]
    with torch.no_grad():
        pm = hf_peft.PeftModel.from_pretrained(load_torch(base), adapter_dir).eval()
    assert np.abs(torch_logits(pm, ids) - ours).max() <= 1e-4

    again = load_peft_adapter(jaxtune.from_pretrained(base, scan_layers=scan), adapter_dir)
    assert np.array_equal(numpy_logits(again, ids), ours)


def test_peft_trained_gpt2_adapter_imports(tmp_path):
    """An adapter made by PEFT on GPT-2's Conv1D layers (fan_in_fan_out) imports exactly."""
    base = base_model("gpt2", tmp_path)
    torch.manual_seed(1)
    cfg = hf_peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
    )
    pm = hf_peft.get_peft_model(load_torch(base), cfg)
    with torch.no_grad():  # as if trained: B away from its zero init
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "torch_adapter")
    assert json.loads((tmp_path / "torch_adapter" / "adapter_config.json").read_text())[
        "fan_in_fan_out"
    ]
    ids = np.random.RandomState(2).randint(0, VOCAB, (2, 10))
    ref = torch_logits(pm.eval(), ids)
    model = load_peft_adapter(jaxtune.from_pretrained(base), tmp_path / "torch_adapter")
    # c_proj matches both attention and MLP output projections, as in PEFT.
    assert model.layers.attn.c_proj.lora_a is not None
    assert model.layers.mlp.c_proj.lora_a is not None
    assert np.abs(numpy_logits(model, ids) - ref).max() <= 1e-4
    assert export_adapter(model, tmp_path / "again", base) <= 1e-4


def test_bottleneck_adapters_identity_at_init_and_only_they_train(tmp_path):
    family, scan = "gemma2", True  # GPT-2 blocks: trained with adapters in the trainer test
    base = base_model(family, tmp_path)
    model = jaxtune.from_pretrained(base, scan_layers=scan)
    ids = np.random.RandomState(3).randint(0, VOCAB, (2, 10))
    ref = numpy_logits(model, ids)
    peft_cfg = PeftConfig(method="adapter", adapter_placement="houlsby", adapter_size=8)
    apply_peft(model, peft_cfg, nnx.Rngs(0))
    # Identity at init (up-projection is zero); XLA may fuse the graph differently.
    assert np.abs(numpy_logits(model, ids) - ref).max() <= 1e-5
    before, trainable, _ = train(model, peft_cfg, steps=2)
    changed = changed_paths(before[0], trainable)
    assert changed and all(
        isinstance(v, AdapterParam) for p, v in nnx.to_flat_state(trainable) if p in changed
    )
    assert {p for p, _ in nnx.to_flat_state(trainable)} == set(before[0])
    n_slots = 2 * (1 if scan else model.config.num_layers)
    assert len({p[:-1] for p in changed}) == n_slots  # every adapter got gradient


@pytest.mark.parametrize("family, method", [("gemma3", "lora"), ("gpt2", "adapter")])
def test_trainer_runs_sharded(family, method, tmp_path, smollm2_tokenizer):
    """The real trainer on an fsdp x tensor mesh (8 fake devices), then reload the run."""
    model_dir = base_model(family, tmp_path / "base", vocab=len(smollm2_tokenizer))
    smollm2_tokenizer.save_pretrained(model_dir)
    data_file = T.write_reverse_data(tmp_path / "train.jsonl")
    run_dir = tmp_path / "x" / "run"
    # LoRA keys (rank, alpha, targets) are refused with adapters: each method its section.
    peft = "{method: adapter}" if method == "adapter" else "{method: lora, rank: 4, alpha: 8}"
    cfg_path = T.write_config(tmp_path / "x" / "cfg.yaml", model_dir, data_file, run_dir, peft=peft)
    over = ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "train.steps=4"]
    out = run_training(load_config(cfg_path, over))
    assert out["steps"] == 4
    loss = np.array([r["loss"] for r in T.read_metrics(run_dir)])
    assert np.all(np.isfinite(loss)) and loss[-1] < loss[0]
    trained = jaxtune.from_pretrained(run_dir)  # latest checkpoint, adapters unmerged
    assert trained.config.family.startswith(family)  # gemma3 -> "gemma3_text"
    if method == "lora":
        assert export_merged(trained, tmp_path / "merged") <= 1e-4
