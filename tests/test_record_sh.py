"""Tests for record.sh: env prefixes, the cli_logs.txt record, exit status, and no evaluation of user text."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

RECORD = Path(__file__).resolve().parent.parent / "record.sh"
PY = sys.executable


def record(tmp_path: Path, *words: str) -> subprocess.CompletedProcess:
    """Run ``bash record.sh words...`` in ``tmp_path``."""
    return subprocess.run(["bash", str(RECORD), *words], cwd=tmp_path, capture_output=True, text=True, timeout=60)


def test_env_prefix_reaches_program_and_log_is_written(tmp_path: Path) -> None:
    out = record(tmp_path, "FOO=bar", "OMP_NUM_THREADS=1", PY, "-c",
                 "import os; print('FOO is', os.environ['FOO'], os.environ['OMP_NUM_THREADS'])",
                 "--output_dir", "runs/a")
    assert out.returncode == 0, out.stderr
    assert "FOO is bar 1" in out.stdout  # still shown on the terminal
    log = (tmp_path / "runs" / "a" / "cli_logs.txt").read_text()
    assert re.search(r"===== record.sh start \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", log)
    for key in ("host:", "user:", f"cwd:     {tmp_path}", "git:"):
        assert key in log
    assert re.search(r"git:\s+([0-9a-f]{40} \((clean|dirty)|not a git repo)", log)
    assert "env:     FOO=bar OMP_NUM_THREADS=1" in log
    assert "command: " in log and "--output_dir runs/a" in log
    assert "FOO is bar 1" in log
    assert re.search(r"exit_status=0 elapsed=\d+\.\d{3} s", log)
    # Order: header, then output, then footer.
    assert log.index("command:") < log.index("FOO is bar") < log.index("exit_status=0")


def test_exit_status_passes_through_and_log_appends(tmp_path: Path) -> None:
    first = record(tmp_path, PY, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)")
    assert first.returncode == 3
    second = record(tmp_path, PY, "-c", "print('second run')")
    assert second.returncode == 0
    log = (tmp_path / "output_dir" / "cli_logs.txt").read_text()  # default output dir
    assert "boom" in log  # stderr is recorded too
    assert "exit_status=3" in log and "second run" in log
    assert log.count("===== record.sh start") == 2


def test_output_dir_equals_spelling_last_wins(tmp_path: Path) -> None:
    out = record(tmp_path, PY, "-c", "print('hi')", "--output_dir", "first", "--output_dir=second dir")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "second dir" / "cli_logs.txt").exists()
    assert not (tmp_path / "first").exists()


def test_user_text_is_not_evaluated(tmp_path: Path) -> None:
    value = 'a b "c" \'d\' $(touch pwned_env) `touch pwned_tick` $HOME;'
    arg = "$(touch pwned_arg)"
    out = record(tmp_path, f"FOO={value}", PY, "-c",
                 "import os, sys; print(repr(os.environ['FOO'])); print(repr(sys.argv[1]))", arg)
    assert out.returncode == 0, out.stderr
    assert repr(value) in out.stdout and repr(arg) in out.stdout
    assert not list(tmp_path.glob("pwned*"))
    log = (tmp_path / "output_dir" / "cli_logs.txt").read_text()
    # The header holds shell-quoted words that paste back to the same values.
    env_line = next(line for line in log.splitlines() if line.startswith("env:"))
    echoed = subprocess.run(["bash", "-c", "printf '%s\\n' " + env_line[len("env:"):].strip()],
                            capture_output=True, text=True, cwd=tmp_path).stdout
    assert echoed == f"FOO={value}\n"
    assert not list(tmp_path.glob("pwned*"))


def test_word_with_equals_after_command_is_an_argument(tmp_path: Path) -> None:
    out = record(tmp_path, PY, "-c", "import os, sys; print(sys.argv[1], 'BAR' in os.environ)", "BAR=1")
    assert out.returncode == 0 and "BAR=1 False" in out.stdout


@pytest.mark.parametrize("words", [[], ["FOO=bar"]])
def test_no_command_is_usage_error(tmp_path: Path, words: list[str]) -> None:
    out = record(tmp_path, *words)
    assert out.returncode == 2
    assert "usage" in out.stderr.lower()
    assert not (tmp_path / "output_dir").exists()


def test_missing_program_exit_status(tmp_path: Path) -> None:
    out = record(tmp_path, "surely-not-a-command-xyz")
    assert out.returncode == 127
    assert "exit_status=127" in (tmp_path / "output_dir" / "cli_logs.txt").read_text()
