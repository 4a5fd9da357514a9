"""Fault injection: ``epmq merge``, ``quantize`` and ``run`` interrupted, then run again.

Each command first runs uninterrupted as a child process, reporting its file events (see
``interrupt_child.py``); that is the reference. Then, for SIGINT, SIGTERM and SIGKILL, the
same command is held at one of those events, picked by a seeded random choice early, half-way
or late (:func:`stop_point`), and signalled there; it is run again (with ``--resume`` where the
command has it) and must end with exit 0 and outputs equal to the reference's, file by file
(JSON and ``report.md`` without their timing fields), with nothing left beside the output (no
partial, resume or temporary files) and the inputs unchanged. SIGINT and SIGTERM must end the
stopped process with one line, no traceback, and exit code 128 + the signal's number.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from interrupt_fixtures import (
    SIGNALS,
    WAIT_S,
    Inputs,
    build_inputs,
    command_args,
    file_digest,
    message_lines,
    output_digest,
    read_events,
    run_child,
    stop_child,
)

COMMANDS = ("merge", "quantize", "run")
SEED = 17


def stop_point(command: str, signame: str, n_events: int) -> int:
    """The event at which ``command`` gets ``signame``: a seeded random one in the first, middle
    or last third of its events, the third rotating with the signal and the command, so each
    command is stopped early, half-way and late, and each signal hits each stage once."""
    third = (COMMANDS.index(command) + list(SIGNALS).index(signame)) % 3
    low, high = third * n_events // 3, (third + 1) * n_events // 3
    return random.Random(f"{SEED}:{command}:{signame}").randrange(low, max(high, low + 1))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return build_inputs(tmp_path_factory.mktemp("inputs"), tmp_path_factory.mktemp("outputs"))


@pytest.fixture(scope="module")
def references(
    inputs: Inputs, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[dict[str, str], list[str]]]:
    """Per command: the uninterrupted run's output digest and its events."""
    events_dir = tmp_path_factory.mktemp("events")
    found = {}
    for command in COMMANDS:
        args, out, _ = command_args(inputs, command)
        events = events_dir / f"{command}.events"
        done = run_child(args, events)
        assert done.returncode == 0, done.stderr
        found[command] = (output_digest(out), read_events(events))
        shutil.rmtree(out)
    return found


@pytest.mark.parametrize("signame", list(SIGNALS))
@pytest.mark.parametrize("command", COMMANDS)
def test_interrupted_command_reruns_to_the_same_outputs(
    inputs: Inputs,
    references: dict[str, tuple[dict[str, str], list[str]]],
    command: str,
    signame: str,
    tmp_path: Path,
) -> None:
    reference, events = references[command]
    args, out, rerun = command_args(inputs, command)
    stop_at = stop_point(command, signame, len(events))
    before = file_digest(inputs.root)
    try:
        stopped = stop_child(args, tmp_path / "events", stop_at, SIGNALS[signame])
        assert stopped.event == events[stop_at]
        where = f"{command} stopped by {signame} at event {stop_at} ({stopped.event})"
        assert stopped.returncode != 0, where
        assert not out.exists(), where  # no output that looks finished
        if signame == "SIGKILL":
            assert stopped.returncode == -9, where
        else:
            assert "Traceback" not in stopped.stderr, (where, stopped.stderr)
            assert message_lines(stopped.stderr) == [f"epmq: stopped by {signame}"], where
            assert stopped.stderr.rstrip().endswith(f"epmq: stopped by {signame}"), where
            assert stopped.returncode == 128 + SIGNALS[signame], where
        if command == "run" and signame != "SIGKILL":
            assert "--resume continues it" in stopped.stdout, (where, stopped.stdout)

        again = subprocess.run(
            [sys.executable, "-m", "epmq", *args, *rerun],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
        assert again.returncode == 0, (where, again.stderr)
        assert output_digest(out) == reference, where
        assert sorted(p.name for p in inputs.out_dir.iterdir()) == [out.name], where
        assert file_digest(inputs.root) == before, where
    finally:  # the next case starts from an empty output folder
        for path in inputs.out_dir.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def test_run_killed_while_writing_its_report_resumes_from_the_journal(
    inputs: Inputs,
    references: dict[str, tuple[dict[str, str], list[str]]],
    tmp_path: Path,
) -> None:
    """SIGKILL between results.json's temporary file and its rename: the resumed run takes
    every model from the journal (nothing is rebuilt) and the half-written file does not reach
    the report folder."""
    reference, events = references["run"]
    args, out, rerun = command_args(inputs, "run")
    stop_at = events.index("replace results.json")
    try:
        stopped = stop_child(args, tmp_path / "events", stop_at, SIGNALS["SIGKILL"])
        assert stopped.returncode == -9
        models = sum(event == "journal key" for event in events)
        again = subprocess.run(
            [sys.executable, "-m", "epmq", *args, *rerun],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
        assert again.returncode == 0, again.stderr
        assert f"{models} models already finished" in again.stdout
        assert output_digest(out) == reference
        assert sorted(p.name for p in inputs.out_dir.iterdir()) == [out.name]
    finally:
        for path in inputs.out_dir.iterdir():
            shutil.rmtree(path)


def test_main_leaves_the_callers_signal_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``epmq.cli.main`` called from Python installs its SIGINT/SIGTERM handlers only while
    the command runs."""
    from epmq.cli import main

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sys, "argv", ["epmq", "version"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)
    assert {s: signal.getsignal(s) for s in before} == before
