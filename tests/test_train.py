"""Trainer invariants on 8 fake CPU devices: resume == uninterrupted, sharded == single."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import tensorboard_scalars

from jaxtune.config import load_config
from jaxtune.train import testing as T
from jaxtune.train.loop import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (2 scanned layers) + word-level tokenizer + instruction data,
    and a persistent XLA cache shared with the single-device subprocess."""
    root = tmp_path_factory.mktemp("tiny")
    model = T.write_tiny_model(root / "model", layers=2)
    data = T.write_reverse_data(root / "train.jsonl")
    with T.persistent_compile_cache(root / "xla"):
        yield model, data, root / "xla"


def make_config(tmp_path, tiny, *extra, peft=None):
    model, data, _ = tiny
    sections = {"peft": peft} if peft else {}
    path = T.write_config(
        tmp_path / "cfg.yaml",
        model,
        data,
        tmp_path / "run",
        data=f"{{train: {data}, format: instruction, template: plain, cache_dir: {tmp_path / 'cache'}}}",
        optim="{lr: 0.01, schedule: linear, warmup_steps: 2}",
        train="{steps: 6, batch_size: 8, seq_len: 32, grad_accum: 2}",
        checkpoint="{every: 0, async_save: false}",
        **sections,
    )
    return load_config(path, list(extra))


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], np.array([r["loss"] for r in rows])


def final_params(run_dir):
    from jaxtune.checkpoint import Checkpointer

    ckpt = Checkpointer(run_dir, async_save=False)
    step = ckpt.latest_step()
    path = run_dir / "checkpoints" / str(step) / "params"
    import orbax.checkpoint as ocp

    out = ocp.StandardCheckpointer().restore(path)
    ckpt.close()
    return step, {k: np.asarray(v) for k, v in out.items()}


def test_resume_equals_uninterrupted(tmp_path, tiny):
    full = make_config(tmp_path / "a", tiny, "mesh.data=8")
    train(full)
    part = make_config(tmp_path / "b", tiny, "mesh.data=8")
    out = train(part, stop_after=3)
    assert out["steps"] == 3
    out = train(part)  # same run.dir: resumes at step 3
    assert out["steps"] == 6
    steps_a, loss_a = losses(tmp_path / "a" / "run")
    steps_b, loss_b = losses(tmp_path / "b" / "run")
    assert steps_a == steps_b == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(loss_a, loss_b)
    sa, pa = final_params(tmp_path / "a" / "run")
    sb, pb = final_params(tmp_path / "b" / "run")
    assert sa == sb == 6
    assert pa.keys() == pb.keys() and len(pa) > 0
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    assert loss_a[-1] < loss_a[0]  # it learns


def test_tensorboard_holds_every_logged_scalar(tmp_path, tiny):
    """A real run, stopped at step 3 and resumed, evaluating every 3 steps: tbparse reads
    back each numeric value of metrics.jsonl under its key at its step."""
    cfg = make_config(
        tmp_path, tiny, "mesh.data=8", "data.validation_fraction=0.25", "train.eval_every=3"
    )
    assert train(cfg, stop_after=3)["steps"] == 3
    assert train(cfg)["steps"] == 6
    run = tmp_path / "run"
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    want: dict[tuple[int, str], list[float]] = {}
    for row in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()):
        for tag, v in row.items():
            if tag != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                want.setdefault((row["step"], tag), []).append(float(v))
    assert {"loss", "lr", "eval/loss"} <= {tag for _, tag in want}
    assert {s for s, tag in want if tag == "eval/loss"} == {3, 6}
    got = tensorboard_scalars(run / "tensorboard")
    assert got.keys() == want.keys()
    for key, values in want.items():
        np.testing.assert_allclose(got[key], values, rtol=1e-6, err_msg=str(key))


SINGLE_DEVICE = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"
from jaxtune.config import load_config
from jaxtune.train.loop import train
train(load_config(sys.argv[1], sys.argv[2:]))
"""


@pytest.mark.parametrize("method", ["lora", "full"])
def test_sharded_meshes_match_single_device(tmp_path, tiny, method):
    # LoRA keys in a full fine-tuning config are refused, so each method has its section.
    peft = "{method: full}" if method == "full" else None
    base = make_config(tmp_path / "x", tiny, peft=peft)
    cfg_file = tmp_path / "x" / "cfg.yaml"
    over = [f"peft.method={method}", "train.steps=5"]
    ref_dir = tmp_path / "single"
    env = {
        **os.environ,
        **T.compile_cache_env(tiny[2]),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }
    res = subprocess.run(
        [sys.executable, "-c", SINGLE_DEVICE, str(cfg_file), *over, f"run.dir={ref_dir}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    _, ref = losses(ref_dir)
    assert base.mesh.data == -1
    for mesh in (
        ["mesh.data=8"],
        ["mesh.data=1", "mesh.fsdp=8"],
        ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"],
    ):
        run_dir = tmp_path / (
            "run_" + "_".join(m.split("=")[0][5:] + m.split("=")[1] for m in mesh)
        )
        cfg = make_config(tmp_path / "x", tiny, *over, *mesh, f"run.dir={run_dir}", peft=peft)
        train(cfg)
        _, got = losses(run_dir)
        np.testing.assert_allclose(got, ref, rtol=1e-5, err_msg=str(mesh))
