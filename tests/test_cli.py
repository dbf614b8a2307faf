"""The ``swift-study`` command table and its one error policy: a user error is one line and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from swift_callbacks import cli


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("swift-study ")


def test_every_command_of_the_table_is_registered():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(cli.COMMANDS)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--config", "no-such.yaml"], "config file 'no-such.yaml' cannot be read"),
        (["score", "--run", "no-such-run"], "no-such-run"),
        (["report", "no-such-run"], "no-such-run does not exist"),
        (["build", "cot", "--input", "no-such.jsonl", "--dry-run"], "no-such.jsonl"),
        (["demo", "--output-dir", "{tmp}/out", "--model", "./no-such-model"], "'./no-such-model' does not exist"),
        (["demo", "--output-dir", "{tmp}/out", "--model", "{tmp}/m.gguf"], "GGUF file"),
    ],
)  # fmt: skip
def test_user_errors_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"swift-study {argv[0]}: error:") and message in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err


def test_the_installed_command_follows_the_policy(tmp_path):
    done = subprocess.run([sys.executable, "-m", "swift_callbacks", "report", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_help_imports_no_torch():
    code = "import sys; from swift_callbacks import cli; cli.build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
