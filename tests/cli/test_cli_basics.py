"""Every sub-command answers --help; user mistakes give one line and exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from epmq.cli import app


def _epmq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "epmq", *args], capture_output=True, text=True, timeout=300
    )


def _command_names() -> list[str]:
    return sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def test_top_level_help_lists_every_command() -> None:
    result = _epmq("--help")
    assert result.returncode == 0
    for name in _command_names():
        assert name in result.stdout


@pytest.mark.parametrize("name", _command_names())
def test_each_command_has_help(name: str) -> None:
    result = _epmq(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_unknown_command_exits_2() -> None:
    result = _epmq("frobnicate")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_version() -> None:
    result = _epmq("version")
    assert result.returncode == 0
    assert result.stdout.strip()[0].isdigit()


def test_run_with_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    if "run" not in _command_names():
        pytest.fail("the run command is not registered")
    config = tmp_path / "bad.yaml"
    config.write_text("suite: text8\nquantization: {bits: [1]}\n")
    result = _epmq("run", str(config))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "quantization.bits" in lines[0]


def test_run_with_missing_config_is_one_line_exit_2(tmp_path: Path) -> None:
    result = _epmq("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"epmq: error: config file {tmp_path / 'nope.yaml'} does not exist"
    )


@pytest.mark.parametrize(
    "args",
    [
        ("run", "examples/configs/text8.yaml", "--check", "--device", "tpu"),
        ("demo", "--device", "cuda:x"),
    ],
    ids=["run", "demo"],
)
def test_bad_device_is_one_line(args: tuple[str, ...]) -> None:
    result = _epmq(*args)
    assert result.returncode == 2, result.stderr
    assert "device must be auto, cpu, cuda or cuda:N" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
