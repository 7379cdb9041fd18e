"""jaxtune owns what it writes: run.dir safety (issue 18, items 1, 2, 3, 6, 7).

- ``train.overwrite=true`` empties only a jaxtune run directory, only of its own entries;
  user files are never deleted (refused instead, naming them).
- A start that fails (bad data, a refused resume, a bad seq_len) leaves run.dir exactly
  as it was; a refused resume names the key, the saved value and the new one.
- ``data inspect`` does not block a later ``train``.
- run.dir a file / read-only / on a full disk: one ``error:`` line, no traceback, no
  temporary checkpoint left behind.

Tiny random Llama + word-level tokenizer (jaxtune.train.testing): a run is a few steps.
"""

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from jaxtune.cli import main
from jaxtune.config import load_config
from jaxtune.errors import ConfigError
from jaxtune.train import testing as T
from jaxtune.train.run_dir import MARKER, OWNED

STEPS = "{steps: 2, batch_size: 8, seq_len: 32}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir")
    T.write_tiny_model(root / "model")
    T.write_reverse_data(root / "train.jsonl", n=32)
    with T.persistent_compile_cache(root / "xla"):  # every run here compiles one program
        yield root


def _cfg(root, name, run=None, **sections) -> Path:
    sections.setdefault("train", STEPS)
    sections.setdefault("checkpoint", "{every: 0, async_save: false}")
    sections.setdefault("logging", "{progress: false, tensorboard: false}")
    sections.setdefault("peft", "{method: lora, rank: 8, alpha: 16, targets: all-linear}")
    return T.write_config(
        root / name / "cfg.yaml",
        root / "model",
        root / name / "train.jsonl"
        if (root / name / "train.jsonl").exists()
        else root / "train.jsonl",
        run or root / name / "run",
        **sections,
    )


def _snapshot(path: Path) -> dict:
    """{relative path: sha256 or 'dir'} of everything under ``path`` (None if missing)."""
    if not path.exists():
        return None
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _cli_error(capsys, argv, code=2) -> str:
    """Runs ``jaxtune ARGV``; asserts the exit code and one ``error:`` line on stderr."""
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _train_ok(capsys, cfg, *over):
    capsys.readouterr()
    assert main(["train", str(cfg), *over]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------ overwrite


def test_overwrite_refuses_user_files_and_leaves_them_intact(root, capsys):
    run = root / "user" / "run"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("my notes\n")
    (run / "data.jsonl").write_bytes((root / "train.jsonl").read_bytes())
    before = _snapshot(run)
    cfg = _cfg(root, "user")
    msg = _cli_error(capsys, ["train", str(cfg), "train.overwrite=true"])
    assert str(run) in msg and "data.jsonl" in msg and "notes.txt" in msg
    assert "overwrite=true" not in msg  # no advice that would be refused anyway
    assert _snapshot(run) == before
    # Without overwrite: the same refusal, nothing written.
    _cli_error(capsys, ["train", str(cfg)])
    assert _snapshot(run) == before


def test_overwrite_of_a_run_deletes_only_its_own_entries(root, capsys, tmp_path):
    cfg = _cfg(root, "own")
    run = root / "own" / "run"
    _train_ok(capsys, cfg)
    assert (run / MARKER).is_file() and (run / "checkpoints" / "2").is_dir()
    # A user file inside a jaxtune run: overwrite refuses, naming it.
    (run / "mine.txt").write_text("keep me")
    before = _snapshot(run)
    msg = _cli_error(capsys, ["train", str(cfg), "train.overwrite=true", "train.steps=3"])
    assert "mine.txt" in msg and "did not write" in msg
    assert _snapshot(run) == before
    (run / "mine.txt").unlink()
    # An owned name that is a symlink out of run.dir: the link goes, never its target.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(b"\x00\x01")
    (run / "export").symlink_to(outside, target_is_directory=True)
    _train_ok(capsys, cfg, "train.overwrite=true", "train.steps=3")
    assert (outside / "precious.bin").read_bytes() == b"\x00\x01"
    assert not (run / "export").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3"]  # started over
    assert [r["step"] for r in T.read_metrics(run)] == [1, 2, 3]
    assert {p.name for p in run.iterdir()} <= OWNED | {MARKER}


def test_run_written_before_the_marker_still_resumes(root, capsys):
    cfg = _cfg(root, "legacy")
    run = root / "legacy" / "run"
    _train_ok(capsys, cfg)
    (run / MARKER).unlink()  # as jaxtune wrote runs before the marker existed
    _train_ok(capsys, cfg, "train.steps=3")
    assert [r["step"] for r in T.read_metrics(run)] == [1, 2, 3]


# ------------------------------------------------------------------ resume checks


def test_refused_resume_names_the_key_and_leaves_the_run_intact(root, capsys, tmp_path):
    import jaxtune
    from jaxtune.export.peft import export_merged

    cfg = _cfg(root, "rank")
    run = root / "rank" / "run"
    _train_ok(capsys, cfg)
    before = _snapshot(run)
    config_bytes = (run / "config.yaml").read_bytes()
    msg = _cli_error(capsys, ["train", str(cfg), "train.steps=4", "peft.rank=16"])
    assert "peft.rank=8" in msg and "16" in msg and str(run) in msg
    assert (run / "config.yaml").read_bytes() == config_bytes
    assert _snapshot(run) == before
    # Several changes: each one named with both values.
    msg = _cli_error(capsys, ["train", str(cfg), "train.seed=1", "optim.name=sgd"])
    assert "train.seed=0 (this run: 1)" in msg and "optim.name=adamw (this run: sgd)" in msg
    assert _snapshot(run) == before
    # The run still loads and exports; settings on the allow-list may change.
    model = jaxtune.from_pretrained(run)
    export_merged(model, tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()
    _train_ok(capsys, cfg, "train.steps=3", "optim.lr=0.005", "checkpoint.keep=2")
    assert [r["step"] for r in T.read_metrics(run)] == [1, 2, 3]


def test_failed_start_on_bad_data_leaves_run_dir_as_it_was(root, capsys):
    (root / "bad").mkdir()
    good = (root / "train.jsonl").read_text()
    (root / "bad" / "train.jsonl").write_text(good + '{"instruction": "Reverse: a b", oops\n')
    cfg = _cfg(root, "bad")
    run = root / "bad" / "run"
    msg = _cli_error(capsys, ["train", str(cfg)])
    assert "train.jsonl" in msg
    assert not run.exists()  # nonexistent stays nonexistent
    # A failed data inspect leaves nothing either.
    _cli_error(capsys, ["data", "inspect", str(cfg)])
    assert not run.exists()
    (root / "bad" / "train.jsonl").write_text(good)  # the fixed rerun starts
    _train_ok(capsys, cfg)
    before = _snapshot(run)
    (root / "bad" / "train.jsonl").write_text(good + "{not json\n")
    _cli_error(capsys, ["train", str(cfg), "train.steps=3"])  # resume on bad data
    assert _snapshot(run) == before


def test_data_inspect_then_train_on_the_same_config(root, capsys):
    cfg = _cfg(root, "inspect")
    run = root / "inspect" / "run"
    capsys.readouterr()
    assert main(["data", "inspect", str(cfg)]) == 0
    assert (run / "data_report" / "report.json").is_file() and (run / MARKER).is_file()
    _train_ok(capsys, cfg)
    assert (run / "checkpoints" / "2").is_dir() and (run / "data_report").is_dir()


# ------------------------------------------------------------------ seq_len


def test_seq_len_above_the_position_limit_is_one_line(root, capsys):
    # RoPE Llama (max_position_embeddings 256 in the tiny preset).
    cfg = _cfg(root, "long", train="{steps: 2, batch_size: 8, seq_len: 100000}")
    msg = _cli_error(capsys, ["train", str(cfg)])
    assert "train.seq_len=100000" in msg and "256" in msg
    assert not (root / "long" / "run").exists()
    # Set on purpose (context extension) it is accepted by this check.
    from jaxtune.train.preflight import check_positions

    check_positions(load_config(cfg, ["model.max_seq_len=100000"]))


def test_seq_len_above_a_learned_position_table_is_refused(root, tmp_path):
    import jax.numpy as jnp

    from jaxtune.hf.io import save_hf
    from jaxtune.models import init_model
    from jaxtune.models.bert import BertConfig
    from jaxtune.train.preflight import check_positions

    bert = save_hf(init_model(BertConfig.tiny(), jnp.float32), tmp_path / "bert")
    path = _cfg(root, "bert", peft="{method: full}")
    cfg = load_config(path, [f"model.path={bert}", "train.seq_len=128"])
    with pytest.raises(ConfigError, match=r"train.seq_len=128 exceeds the 64 positions"):
        check_positions(cfg)
    check_positions(load_config(path, [f"model.path={bert}", "train.seq_len=64"]))


# ------------------------------------------------------------------ bad run.dir


def test_run_dir_that_is_a_file(root, capsys):
    path = root / "afile"
    path.write_text("not a directory")
    cfg = _cfg(root, "file", run=path)
    msg = _cli_error(capsys, ["train", str(cfg)])
    assert msg == f"error: run.dir {path} is a file, expected a directory"
    assert path.read_text() == "not a directory"
    _cli_error(capsys, ["data", "inspect", str(cfg)])


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    """A small tmpfs at ``path`` (root only; skips where mounting is not permitted)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_run_dir_not_writable(root, capsys, tmp_path):
    if os.geteuid() != 0:  # permission bits bind only non-root users
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        ctx = contextlib.nullcontext(ro)
    else:  # root ignores permission bits: a read-only filesystem does bind
        ctx = _tmpfs(tmp_path / "ro", "ro,size=64k")
    with ctx as ro:
        cfg = _cfg(root, "ro", run=ro / "run")
        msg = _cli_error(capsys, ["train", str(cfg)])
        assert "not writable" in msg and str(ro / "run") in msg
        assert not (ro / "run").exists()


def test_disk_full_while_checkpointing(root, capfd, tmp_path):
    # Full fine-tuning of a wider model: its checkpoint (weights + Adam moments, ~1 MB of
    # random floats) cannot fit in 256 KiB, while config and metrics do.
    T.write_tiny_model(tmp_path / "wide", hidden=64, layers=2)
    with _tmpfs(tmp_path / "disk", "size=256k") as disk:
        run = disk / "run"
        cfg = T.write_config(
            tmp_path / "cfg.yaml",
            tmp_path / "wide",
            root / "train.jsonl",
            run,
            peft="{method: full}",
            train=STEPS,
            checkpoint="{every: 0, async_save: true}",
            logging="{progress: false, tensorboard: false}",
        )
        capfd.readouterr()
        assert main(["train", str(cfg)]) == 1
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines == [f"error: no space left on device writing {run / 'checkpoints' / '2'}"], (
            err[-3000:]
        )
        assert not list((run / "checkpoints").glob("*orbax-checkpoint-tmp*"))
        assert (run / "config.yaml").is_file()  # the run itself is intact


def test_what_a_directory_without_marker_may_hold(tmp_path):
    from jaxtune.train.run_dir import plan_start

    def start(files: dict, *over):
        run = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        for name, text in files.items():
            (run / name).parent.mkdir(parents=True, exist_ok=True)
            (run / name).write_text(text)
        run.mkdir(exist_ok=True)
        cfg = load_config(None, [f"run.dir={run}", "train.steps=1", "peft.alpha=8", *over])
        return plan_start(cfg)

    assert start({}).mode == "fresh"  # empty
    # What jaxtune's own commands left there is adopted.
    assert start({"data_report/report.json": "{}"}).mode == "fresh"
    assert start({"eval/eval_report.json": "{}", "eval/eval_report.md": ""}).mode == "fresh"
    # A user's own config.yaml, an eval folder of theirs: never written over.
    for files in ({"config.yaml": "train: {steps: 1}"}, {"eval/mine.txt": "x"}):
        for over in ((), ("train.overwrite=true",)):
            with pytest.raises(ConfigError, match="not a jaxtune run directory"):
                start(files, *over)
