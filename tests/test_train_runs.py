"""Whole runs of the trainer on a tiny model: preemption (SIGTERM), SIGKILL + resume,
restore on another device count, two processes == one, non-finite stop, config errors.

One uninterrupted reference run (LoRA on an FSDP-8 mesh, async checkpoints every 2
steps) is the baseline every interrupted or distributed run must reproduce.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest
from helpers import tensorboard_scalars

from jaxtune.config import load_config
from jaxtune.train import testing as T
from jaxtune.train.loop import train

MESH = "{data: 1, fsdp: 8, tensor: 1}"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    model = T.write_tiny_model(root / "model")
    data = T.write_reverse_data(root / "train.jsonl")
    cache = root / "xla"

    def config(name: str, **sections) -> str:
        sections.setdefault("mesh", MESH)
        path = T.write_config(
            root / name / "cfg.yaml", model, data, root / name / "run", **sections
        )
        return str(path)

    env = {**os.environ, **T.compile_cache_env(cache), "JAX_PLATFORMS": "cpu"}
    with T.persistent_compile_cache(cache):
        summary = train(load_config(config("ref")))
        yield types.SimpleNamespace(
            root=root, config=config, env=env, summary=summary, run=root / "ref" / "run"
        )


def _wait_rows(run_dir, n: int, proc, timeout: float = 300.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"training exited early ({proc.returncode}):\n{out[-3000:]}")
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {n} metrics rows after {timeout}s")


# Runs `jaxtune train CONFIG` with a pause after each logged step, so a test can signal
# it mid-run at a known point.
SLOW_TRAIN = textwrap.dedent(
    """
    import sys, time
    from jaxtune.train import logger
    log = logger.MetricsLogger.log
    def slow_log(self, row):
        log(self, row)
        time.sleep(float(sys.argv[2]))
    logger.MetricsLogger.log = slow_log
    from jaxtune.cli import main
    sys.exit(main(["train", sys.argv[1]]))
    """
)


def _start_slow(ref, cfg: str, pause: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, cfg, str(pause)],
        env=ref.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _assert_same_params(run_a, run_b):
    sa, pa = T.checkpoint_arrays(run_a)
    sb, pb = T.checkpoint_arrays(run_b)
    assert sa == sb and pa.keys() == pb.keys() and pa
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_reference_run_compiles_once_and_logs(ref):
    assert ref.summary["steps"] == 6
    assert ref.summary["compiles"] == 1  # fixed length buckets: no recompilation
    rows = T.read_metrics(ref.run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["flops_per_sec"] > 0 and r["mfu"] is None for r in rows)  # CPU: no peak
    from jaxtune.checkpoint import Checkpointer

    ckpt = Checkpointer(ref.run, async_save=False)
    assert ckpt.all_steps() == [2, 4, 6]
    ckpt.close()
    assert len(list((ref.run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    scalars = tensorboard_scalars(ref.run / "tensorboard")
    losses = sorted((step, v) for (step, tag), (v,) in scalars.items() if tag == "loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([v for _, v in losses], [r["loss"] for r in rows], rtol=1e-6)


def test_sigterm_saves_a_checkpoint_exits_0_and_resumes(ref):
    cfg = ref.config("sigterm")
    run = ref.root / "sigterm" / "run"
    proc = _start_slow(ref, cfg, 1.0)
    _wait_rows(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by SIGTERM" in out
    reached = T.read_metrics(run)[-1]["step"]
    assert 2 <= reached < 6
    assert T.checkpoint_arrays(run)[0] == reached  # saved at the step it reached
    summary = train(load_config(cfg))  # re-running resumes and finishes
    assert summary["steps"] == 6
    assert [r["step"] for r in T.read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    _assert_same_params(run, ref.run)


def test_sigkill_resumes_from_the_last_complete_checkpoint(ref):
    cfg = ref.config("sigkill")
    run = ref.root / "sigkill" / "run"
    proc = _start_slow(ref, cfg, 0.5)
    _wait_rows(run, 4, proc)  # checkpoint 2 is done, checkpoint 4 may be in flight
    proc.kill()
    proc.communicate(timeout=60)
    from jaxtune.checkpoint import Checkpointer

    ckpt = Checkpointer(run, async_save=False)
    assert ckpt.latest_step() in (2, 4)
    ckpt.close()
    summary = train(load_config(cfg))
    assert summary["steps"] == 6
    rows = T.read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(
        [r["loss"] for r in rows], [r["loss"] for r in T.read_metrics(ref.run)]
    )
    _assert_same_params(run, ref.run)


ONE_DEVICE_LOGITS = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    import numpy as np, jax, jaxtune
    from jaxtune.verify import numpy_logits
    assert jax.device_count() == 1
    model = jaxtune.from_pretrained(sys.argv[1])
    ids = (np.arange(24, dtype=np.int32).reshape(2, 12) * 5) % 16
    np.save(sys.argv[2], numpy_logits(model, ids))
    """
)


def test_run_saved_on_8_devices_restores_on_1(ref):
    from flax import nnx

    from jaxtune.checkpoint import Checkpointer
    from jaxtune.loading import build_model
    from jaxtune.peft.trainable import trainable_filter
    from jaxtune.sharding import make_mesh
    from jaxtune.verify import numpy_logits

    out = ref.root / "logits_1dev.npy"
    res = subprocess.run(
        [sys.executable, "-c", ONE_DEVICE_LOGITS, str(ref.run), str(out)],
        env=ref.env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # The trained model as the 8-device run holds it: FSDP-sharded, restored in place.
    cfg = load_config(ref.run / "config.yaml")
    model = build_model(cfg, make_mesh(1, 8, 1))
    _, params, _ = nnx.split(model, trainable_filter(model, cfg.peft), ...)
    ckpt = Checkpointer(ref.run, async_save=False)
    params, _, _, _ = ckpt.restore(6, params)
    ckpt.close()
    nnx.update(model, params)
    ids = (np.arange(24, dtype=np.int32).reshape(2, 12) * 5) % 16
    np.testing.assert_allclose(np.load(out), numpy_logits(model, ids), atol=1e-5, rtol=1e-5)


TWO_PROCESS_TRAIN = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    from jaxtune.train.distributed import initialize
    assert initialize(sys.argv[2], 2, int(sys.argv[3]))
    import jax
    assert jax.process_count() == 2 and jax.device_count() == 8
    from jaxtune.config import load_config
    from jaxtune.train.loop import train
    train(load_config(sys.argv[1]))
    """
)


def _train_on_two_processes(cfg: str, env: dict) -> list[tuple[int, str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_PROCESS_TRAIN, cfg, f"127.0.0.1:{port}", str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outs, strict=True)]


def test_two_processes_match_one(ref):
    """2 processes x 4 CPU devices (gloo collectives) == 1 process x 8 devices."""
    name = "two_hosts"
    results = _train_on_two_processes(ref.config(name), ref.env)
    if any("Gloo context initialization failed" in out for _, out in results):
        # Gloo waits 30 s (fixed inside jaxlib) for the other process at its first
        # collective; on a loaded 2-core machine one process can lag more than that
        # (seen once in a full suite). One more try, in a fresh run dir; a wrong result
        # still fails below.
        name = "two_hosts_again"
        results = _train_on_two_processes(ref.config(name), ref.env)
    for code, out in results:
        assert code == 0, out[-3000:]
    run = ref.root / name / "run"
    got = [r["loss"] for r in T.read_metrics(run)]
    want = [r["loss"] for r in T.read_metrics(ref.run)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    sa, pa = T.checkpoint_arrays(run)
    sb, pb = T.checkpoint_arrays(ref.run)
    assert sa == sb == 6
    for k in pb:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(ref, capsys):
    from jaxtune.checkpoint import Checkpointer
    from jaxtune.cli import main

    cfg = ref.config(
        "nan",
        optim="{lr: 1.0e+30, schedule: constant}",
        checkpoint="{every: 1, async_save: true}",
    )
    assert main(["train", cfg]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "non-finite at step" in err[0]
    bad = int(err[0].split("non-finite at step ")[1].split()[0])
    run = ref.root / "nan" / "run"
    ckpt = Checkpointer(run, async_save=False)
    assert ckpt.latest_step() == bad - 1 >= 1
    assert f"last good checkpoint is step {bad - 1}" in err[0]
    ckpt.close()
    assert [r["step"] for r in T.read_metrics(run)] == list(range(1, bad))
    _, params = T.checkpoint_arrays(run)
    assert all(np.isfinite(v).all() for v in params.values())


@pytest.mark.parametrize(
    "override, message",
    [
        ("mesh.data=3", "does not match 8 devices"),
        ("train.batch_size=4", "not divisible by mesh data x fsdp"),
    ],
)
def test_config_errors_exit_2_with_one_line(ref, capsys, override, message):
    from jaxtune.cli import main

    assert main(["train", ref.config("bad"), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_multihost_settings_from_flags_and_environment():
    from jaxtune.errors import ConfigError
    from jaxtune.train.distributed import cluster_detected, initialize

    assert cluster_detected({}) is None
    assert cluster_detected({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None  # one task
    assert cluster_detected({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) == "SLURM"
    assert cluster_detected({"OMPI_COMM_WORLD_SIZE": "2"}) == "Open MPI"
    assert cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"}) == "TPU pod"
    assert cluster_detected({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # one TPU VM
    assert initialize(environ={}) is False  # nothing configured: a single process
    assert initialize("h:1", 1, 0, environ={}) is False
    with pytest.raises(ConfigError, match="give all of"):
        initialize("h:1", environ={})
    with pytest.raises(ConfigError, match="not in"):
        initialize(
            environ={
                "JAXTUNE_COORDINATOR": "h:1",
                "JAXTUNE_NUM_PROCESSES": "2",
                "JAXTUNE_PROCESS_ID": "2",
            }
        )
