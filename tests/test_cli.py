"""The jaxtune command line: help texts, typo suggestions, exit codes."""

import subprocess
import sys

import pytest

from jaxtune.cli import COMMANDS, build_parser, main


def run(*args):
    res = subprocess.run([sys.executable, "-m", "jaxtune", *args], capture_output=True, text=True)
    return res.returncode, res.stdout, res.stderr


def test_top_level_help_lists_every_command():
    code, out, _ = run("--help")
    assert code == 0
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_subcommand_help_explains_options_and_shows_an_example(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert ("example:" in out or "examples:" in out) and f"jaxtune {name}" in out
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[name]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{name} {action.option_strings} has no help text"


def test_help_does_not_import_jax():
    """`jaxtune --help` and every `jaxtune COMMAND --help` stay light: a command's module
    (and with it jax) is imported only when that command runs."""
    code = (
        "import contextlib, io, sys\n"
        "from jaxtune.cli import COMMANDS, main\n"
        "for argv in [['--help'], *[[name, '--help'] for name in COMMANDS]]:\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "heavy = {'jax', *COMMANDS.values()}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_typo_in_subcommand_suggests_the_right_one():
    code, _, err = run("trian", "x.yaml")
    assert code == 2
    assert "Did you mean 'train'?" in err


def test_typo_in_option_suggests_the_right_one():
    code, _, err = run("generate", "--model", "m", "--prompt", "hi", "--max-new-tokns", "3")
    assert code == 2
    assert "--max-new-tokens" in err


def test_user_error_is_one_line_without_traceback(tmp_path):
    code, _, err = run("train", str(tmp_path / "missing.yaml"))
    assert code == 2
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0 and err.startswith("error:")
    assert "missing.yaml" in err


def test_version():
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("jaxtune ")


def test_malloc_is_set_by_the_entry_point_before_the_command_imports_jax(monkeypatch, tmp_path):
    import jaxtune.cli as cli

    seen = []

    def record():
        # The command's module (which imports jax) is imported after this call.
        seen.append(COMMANDS["data"] in sys.modules)

    monkeypatch.setattr(cli, "keep_freed_memory", record)
    monkeypatch.delitem(sys.modules, COMMANDS["data"], raising=False)
    monkeypatch.setattr(sys, "argv", ["jaxtune", "data", "inspect", str(tmp_path / "x.yaml")])
    assert cli.entry() == 2
    assert seen == [False]
    # main() alone (a program or a test calling it in-process) leaves malloc alone.
    assert main(["data", "inspect", str(tmp_path / "x.yaml")]) == 2
    assert seen == [False]
