"""Run ``epmq`` with its file events observable, and hold it at one of them to be signalled.

    python interrupt_child.py EVENTS_FILE STOP_AT epmq-arguments...

Every event is appended to ``EVENTS_FILE`` as one line as it happens:

- ``replace <name>``: just before an ``os.replace`` (a file written whole but not yet renamed
  into place, or a finished folder about to take its name);
- ``journal <n>``: just after the ``n``-th journal line of ``epmq run`` was written and fsynced;
- ``tensor <name>``: just after ``epmq merge`` streamed one tensor into its output file.

At event number ``STOP_AT`` (counted from 0; -1: never) the process writes ``EVENTS_FILE.ready``
and waits there until a signal ends it, so the test interrupts it at a chosen program point
rather than after a guessed delay. The rest is the real command line, ``epmq.cli.main``, with
its own signal handling.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any


def main() -> None:
    events_file, stop_at, *argv = sys.argv[1:]
    events = Path(events_file)
    stop = int(stop_at)
    count = [0]
    replace = os.replace

    def event(what: str) -> None:
        with events.open("a", encoding="utf-8") as handle:
            handle.write(what + "\n")
        number = count[0]
        count[0] += 1
        if number == stop:  # written whole, then renamed: the test never reads it half-done
            Path(f"{events}.held").write_text(what + "\n", encoding="utf-8")
            replace(f"{events}.held", f"{events}.ready")
            while True:  # held here until the test's signal
                time.sleep(0.05)

    def observed_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        event(f"replace {Path(dst).name}")
        replace(src, dst, *args, **kwargs)

    os.replace = observed_replace  # type: ignore[assignment]

    from epmq.experiment.journal import Journal
    from epmq.merging.writer import StreamingSafetensorsWriter

    append, add = Journal._append, StreamingSafetensorsWriter.add

    def observed_append(self: Journal, entry: dict[str, Any], mode: str = "a") -> None:
        append(self, entry, mode)
        event(f"journal {sorted(entry)[0]}")

    def observed_add(self: StreamingSafetensorsWriter, name: str, tensor: Any) -> None:
        add(self, name, tensor)
        event(f"tensor {name}")

    Journal._append = observed_append  # type: ignore[method-assign]
    StreamingSafetensorsWriter.add = observed_add  # type: ignore[method-assign]

    from epmq.cli import main as epmq_main

    sys.argv = ["epmq", *argv]
    epmq_main()


if __name__ == "__main__":
    main()
