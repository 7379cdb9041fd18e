"""Walks docs/errors.md: every bad input listed there gives its exit code and message.

Each row of the table is a real command run in-process through ``jaxtune.cli.main``
on files this module writes (a tiny random Llama, a finished tiny run, broken data and
config files). A row passes when the exit code is the documented one, stderr is exactly
one ``error:`` line equal to the documented message (``…`` stands for any text), and no
traceback was printed. The table is the documentation, so a changed message fails here
until the doc says the same.

``JAXTUNE_ERRORS_RECORD=1 pytest tests/test_error_table.py`` rewrites the message and
exit columns from what the commands print now (then read the diff before committing).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import traceback
from pathlib import Path

import pytest

from jaxtune.cli import main
from jaxtune.train.testing import write_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
RECORD = bool(os.environ.get("JAXTUNE_ERRORS_RECORD"))
ROW = re.compile(r"^\| (\d+) \| (.*?) \| `(.*?)` \| (-?\d+) \| (.*) \|$")


def _json_lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _model_dir_with(path: Path, model: Path, **config_changes) -> None:
    """A copy of the tiny model dir whose config.json has ``config_changes`` applied."""
    path.mkdir()
    for f in model.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(config_changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _pickled_model(path: Path, model: Path) -> None:
    """An HF dir as older checkpoints ship it: config, tokenizer, pickled weights."""
    path.mkdir()
    for f in model.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            (path / f.name).write_bytes(f.read_bytes())
    (path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not read: pickles are refused")


def _run_without_checkpoint(path: Path, cfg: Path) -> None:
    path.mkdir()
    (path / "config.yaml").write_bytes(cfg.read_bytes())
    (path / "checkpoints").mkdir()


def _run_with_user_file(path: Path, run: Path) -> None:
    """A copy of the finished run into which the user dropped a file of their own."""
    shutil.copytree(run, path, symlinks=True)
    (path / "notes.txt").write_text("mine\n")


GOOD = {"instruction": "Reverse: alpha beta", "output": "beta alpha"}

# Files each row may name as {tmp}/NAME: text, or a function of (path, model, cfg).
FILES = {
    "broken.yaml": "model: {path: x\ntrain: [\n",
    "dup.yaml": "train:\n  steps: 3\ntrain:\n  steps: 4\n",
    "list.yaml": "- train\n- steps\n",
    "bad_line.jsonl": _json_lines(GOOD, "{not json", GOOD),
    "no_output.jsonl": _json_lines(GOOD, {"instruction": "Reverse: alpha"}),
    "empty.jsonl": "",
    "long.jsonl": _json_lines({"instruction": "Reverse: " + "alpha " * 40, "output": "beta"}),
    "chat.jsonl": _json_lines({"messages": [{"role": "user", "content": "alpha"}]}),
    "pairs_bad.jsonl": _json_lines(
        {"prompt": "Reverse: alpha beta", "chosen": " beta alpha", "rejected": " alpha beta"},
        {"prompt": "Reverse: alpha", "chosen": " alpha"},
    ),
    "labels.jsonl": _json_lines({"text": "alpha", "label": "pos"}, {"text": "beta", "label": 7}),
    "mc_bad.jsonl": _json_lines({"context": "alpha", "choices": ["beta", "gamma"], "label": 5}),
    "cf_bad.jsonl": _json_lines(
        {"attribute": "w", "variants": {"a": "alpha", "b": "beta"}},
        {"attribute": "w", "variants": {"a": "alpha"}},
    ),
    "notes.txt": "my notes\n",
    "userdir": lambda p, model, cfg: (p.mkdir(), (p / "notes.txt").write_text("mine\n")),
    "bin_model": lambda p, model, cfg: _pickled_model(p, model),
    "quantized_model": lambda p, model, cfg: _model_dir_with(
        p, model, quantization_config={"quant_method": "bitsandbytes"}
    ),
    "other_arch": lambda p, model, cfg: _model_dir_with(p, model, model_type="mamba"),
    "nockpt_run": lambda p, model, cfg: _run_without_checkpoint(p, cfg),
    "run_with_notes": lambda p, model, cfg: _run_with_user_file(p, cfg.parent / "run"),
}


@pytest.fixture(scope="module")
def shared(tiny_run):
    """The tiny model, and one finished run of it (LoRA rank 4, 2 steps) with its config."""
    return {**tiny_run, "run_cfg": tiny_run["cfg"]}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows() -> list[tuple]:
    rows = []
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            rows.append(m.groups())
    return rows


def _pattern(message: str) -> re.Pattern:
    parts = [re.escape(p) for p in message.replace("\\|", "|").split("…")]
    return re.compile("^" + ".*".join(parts) + "$")


def _places(tmp: Path, cfg: Path, shared: dict) -> dict[str, str]:
    return {
        "tmp": str(tmp),
        "cfg": str(cfg),
        "model": str(shared["model"]),
        "run": str(shared["run"]),
        "runcfg": str(shared["run_cfg"]),
    }


def _run(command: str, places: dict, capsys) -> tuple[int, str, str]:
    argv = shlex.split(command)
    assert argv[0] == "jaxtune"
    argv = [_place(a, places) for a in argv[1:]]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    except Exception:  # a traceback is exactly what this table rules out
        code, err = -1, traceback.format_exc()
        return code, capsys.readouterr().out, err
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _place(text: str, places: dict) -> str:
    for key, value in places.items():
        text = text.replace("{" + key + "}", value)
    return text


def _unplace(text: str, places: dict) -> str:
    for key in sorted(places, key=lambda k: -len(places[k])):
        text = text.replace(places[key], "{" + key + "}")
    return text


def test_table_has_at_least_30_distinct_bad_inputs():
    rows = _rows()
    assert len(rows) >= 30
    assert len({r[2] for r in rows}) == len(rows), "a command is listed twice"
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))


_RECORDED: dict[int, tuple[int, str]] = {}


@pytest.mark.parametrize("row", _rows(), ids=lambda r: f"{r[0]}-{r[1][:40]}")
def test_bad_input(row, shared, tmp_path, capsys):
    number, _what, command, exit_code, message = row
    cfg = write_config(tmp_path / "cfg.yaml", shared["model"], shared["data"], tmp_path / "run")
    for name, content in FILES.items():
        if "{tmp}/" + name in command:
            if callable(content):
                content(tmp_path / name, shared["model"], shared["run_cfg"])
            else:
                (tmp_path / name).write_text(content)
    run_before = _snapshot(shared["run"])
    places = _places(tmp_path, cfg, shared)
    code, out, err = _run(command, places, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if RECORD:
        _RECORDED[int(number)] = (code, _unplace(lines[-1] if lines else "", places))
        _record_if_last(int(number))
        return
    assert "Traceback" not in err, err
    assert code == int(exit_code), f"exit {code}, expected {exit_code}; stderr: {err}"
    errors = [ln for ln in lines if ln.startswith("error:") or ": error: " in ln]
    assert len(errors) == 1, f"expected one error line, got: {err}"
    doc = _place(message, places)
    assert _pattern(doc).match(errors[0]), f"\n got: {errors[0]}\nwant: {doc}"
    # Failed commands never touch the finished run they were pointed at.
    assert _snapshot(shared["run"]) == run_before


def _record_if_last(number: int) -> None:
    rows = _rows()
    if number != int(rows[-1][0]):
        return
    out = []
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m and int(m.group(1)) in _RECORDED:
            code, msg = _RECORDED[int(m.group(1))]
            msg = msg.replace("|", "\\|")
            line = f"| {m.group(1)} | {m.group(2)} | `{m.group(3)}` | {code} | {msg} |"
        out.append(line)
    DOC.write_text("\n".join(out) + "\n")
