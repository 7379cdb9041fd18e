"""Preference runs through the trainer: resume == uninterrupted (bitwise), a data x fsdp
mesh == one device, TRL-named metrics in metrics.jsonl, and exports of the run."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import jaxtune
from jaxtune.cli import main
from jaxtune.config import load_config
from jaxtune.train import testing as T
from jaxtune.train.loop import train
from jaxtune.train.plan import plan
from jaxtune.verify import numpy_logits

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
LOGPS = ("logps/chosen", "logps/rejected")


def write_pairs(path, n=32, seed=0):
    """Prompt ``Reverse: a b c``; chosen = the words reversed, rejected = as they came."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = list(rng.choice(T.WORDS, rng.integers(2, 6)))
            row = {
                "prompt": "Reverse: " + " ".join(words),
                "chosen": " " + " ".join(words[::-1]),
                "rejected": " " + " ".join(words),
            }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref_train")
    model = T.write_tiny_model(root / "model", layers=2)
    data = write_pairs(root / "pairs.jsonl")
    with T.persistent_compile_cache(root / "xla"):
        yield model, data, root / "xla"


def make_config(tmp_path, tiny, *extra, objective="dpo", peft=None, train_="", data_=""):
    model, data, _ = tiny
    sections = {"peft": peft} if peft else {}
    path = T.write_config(
        tmp_path / "cfg.yaml",
        model,
        data,
        tmp_path / "run",
        data=f"{{train: {data}, format: preference, length_buckets: [32], "
        f"cache_dir: {tmp_path.parent / 'cache'}{data_}}}",
        optim="{lr: 0.01, schedule: linear, warmup_steps: 1}",
        train=f"{{steps: 4, batch_size: 8, seq_len: 32, objective: {objective}{train_}}}",
        checkpoint="{every: 0, async_save: false}",
        **sections,
    )
    return load_config(path, list(extra))


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_resume_equals_uninterrupted_with_trl_metrics(tmp_path, tiny):
    """LoRA DPO, 2 micro-batches per step, evaluated every 2 steps, on 8 devices."""
    kw = dict(train_=", grad_accum: 2, eval_every: 2", data_=", validation_fraction: 0.25")
    full = make_config(tmp_path / "a", tiny, "mesh.data=8", **kw)
    train(full)
    part = make_config(tmp_path / "b", tiny, "mesh.data=8", **kw)
    assert train(part, stop_after=2)["steps"] == 2
    assert train(part)["steps"] == 4  # same run.dir: resumes at step 2
    a, b = rows(tmp_path / "a" / "run"), rows(tmp_path / "b" / "run")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    keys = ["loss", *REWARDS, *LOGPS]
    for ra, rb in zip(a, b, strict=True):
        for k in keys + [k for k in ra if k.startswith("eval/")]:
            assert ra[k] == rb[k], (ra["step"], k)  # bit for bit
    evals = [r for r in a if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert {f"eval/{k}" for k in (*REWARDS, *LOGPS)} <= evals[0].keys()
    # LoRA starts as the base model, which is the reference: every reward is 0, the
    # sigmoid loss log 2; then the policy learns to prefer the chosen side.
    assert a[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert a[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert a[-1]["rewards/margins"] > 0 and a[-1]["loss"] < a[0]["loss"]
    assert a[-1]["rewards/accuracies"] > 0.5
    (sa, pa), (sb, pb) = (T.checkpoint_arrays(tmp_path / x / "run") for x in "ab")
    assert sa == sb == 4 and pa.keys() == pb.keys() and pa
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


SINGLE_DEVICE = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"
from jaxtune.config import load_config
from jaxtune.train.loop import train
from jaxtune.train.plan import plan
train(load_config(sys.argv[1], sys.argv[2:]))
"""


def test_full_dpo_on_a_data_x_fsdp_mesh_matches_one_device(tmp_path, tiny):
    """Full fine-tuning: the reference is a frozen copy, sharded like the policy."""
    base = make_config(tmp_path / "x", tiny, peft="{method: full}")
    cfg_file = tmp_path / "x" / "cfg.yaml"
    ref_dir = tmp_path / "single"
    env = {
        **os.environ,
        **T.compile_cache_env(tiny[2]),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }
    res = subprocess.run(
        [sys.executable, "-c", SINGLE_DEVICE, str(cfg_file), f"run.dir={ref_dir}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert base.mesh.data == -1
    run_dir = tmp_path / "mesh"
    train(
        make_config(
            tmp_path / "x",
            tiny,
            "mesh.data=2",
            "mesh.fsdp=4",
            f"run.dir={run_dir}",
            peft="{method: full}",
        )
    )
    want, got = rows(ref_dir), rows(run_dir)
    for k in ("loss", "rewards/margins", "logps/chosen"):
        # atol: at step 2 (lr 0 during the warmup step) margins are 0 up to rounding.
        np.testing.assert_allclose(
            [r[k] for r in got], [r[k] for r in want], rtol=1e-5, atol=1e-6, err_msg=k
        )
    assert got[-1]["loss"] < got[0]["loss"]
    # Reference log-probabilities precomputed once (and cached): the same run, no copy.
    pre_dir = tmp_path / "pre"
    over = ["mesh.data=2", "mesh.fsdp=4", f"run.dir={pre_dir}", "preference.precompute_ref=true"]
    train(make_config(tmp_path / "x", tiny, *over, peft="{method: full}"))
    cached = list((tmp_path / "cache" / "ref_logps").glob("train-*.npy"))
    assert len(cached) == 1 and np.load(cached[0]).shape == (64,)  # 32 pairs, 2 sides
    pre = rows(pre_dir)
    for k in ("loss", "rewards/margins", "logps/chosen"):
        np.testing.assert_allclose(
            [r[k] for r in pre], [r[k] for r in want], rtol=1e-5, atol=1e-6, err_msg=k
        )


def test_orpo_run_exports_merged_and_as_peft_adapter(tmp_path, tiny):
    cfg = make_config(tmp_path, tiny, "train.steps=2", objective="orpo")
    out = train(cfg)
    r = rows(tmp_path / "run")
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", *REWARDS} <= r[-1].keys()
    run = out["run_dir"]
    assert main(["export", run, str(tmp_path / "merged"), "--merged"]) == 0
    assert main(["export", run, str(tmp_path / "adapter"), "--adapter"]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    ids = np.array([[4, 5, 6, 7, 8, 9]])
    trained = numpy_logits(jaxtune.from_pretrained(run), ids)
    merged = numpy_logits(jaxtune.from_pretrained(tmp_path / "merged"), ids)
    np.testing.assert_allclose(merged, trained, atol=1e-5)
    base = numpy_logits(jaxtune.from_pretrained(tiny[0]), ids)
    assert np.abs(trained - base).max() > 1e-4  # the run changed the model
    # What users load them with: transformers for the merged dir, peft for the adapter.
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        np.testing.assert_allclose(hf(torch.tensor(ids)).logits.numpy(), trained, atol=1e-4)
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(tiny[0])
        pm = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
        np.testing.assert_allclose(pm(torch.tensor(ids)).logits.numpy(), trained, atol=1e-4)


def test_plan_compiles_full_dpo_with_its_frozen_reference_copy(tiny):
    over = [f"model.path={tiny[0]}", "peft.method=full", "train.steps=2", "train.seq_len=16"]
    over += ["train.batch_size=2", "train.objective=dpo", "data.format=preference"]
    p = plan(load_config(None, over), jax.devices()[:1], target="cpu")
    weights = 4 * p.params["total"]  # float32
    # Arguments: weights, Adam's two moments, the reference copy, and 2 x 2 batch lines.
    assert 4 * weights < p.argument_bytes < 4 * weights + 4096
