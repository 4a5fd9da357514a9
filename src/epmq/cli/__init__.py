"""The ``epmq`` command line.

One module per sub-command lives in this package (``merge_command.py``, ``demo_command.py``,
...); each registers itself on :data:`epmq.cli.app.app` with ``@app.command()``. Importing this
package imports every ``*_command`` module, so adding a command is adding one file.

Sub-commands are thin shells over the Python API. User mistakes raise
:class:`epmq.errors.EpmqError`; :func:`main` prints them as one line and exits with code 2.
SIGINT (Ctrl-C) and SIGTERM (a killed job) raise :class:`epmq.errors.Stopped` instead of
killing the process, so every output folder is cleaned up (or, for a resumable run, kept for
``--resume``) as on an error; :func:`main` prints one line and exits with 128 + the signal's
number (130, 143). A second signal while the first unwinds ends the process at once.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import signal
import sys
import threading
from types import FrameType

from epmq.cli.app import app
from epmq.errors import DISK_FULL, EpmqError, Stopped

for _module in pkgutil.iter_modules(__path__):
    if _module.name.endswith("_command"):
        importlib.import_module(f"{__name__}.{_module.name}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop(signum: int, frame: FrameType | None) -> None:
    """Signal handler: the first SIGINT/SIGTERM raises :class:`Stopped`; a second one, while
    the first unwinds, gets the default action (the process ends at once)."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_DFL)
    raise Stopped(signum)


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2, and a stop
    by SIGINT/SIGTERM into one line and exit code 128 + the signal's number."""
    main_thread = threading.current_thread() is threading.main_thread()  # else no handlers
    previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS} if main_thread else {}
    try:
        app()
    except EpmqError as err:
        print(f"epmq: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except Stopped as stop:
        print(f"epmq: {stop}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except OSError as err:  # a write that no EpmqError names (a save_pretrained, the journal)
        if err.errno not in DISK_FULL:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"epmq: error: {os.strerror(err.errno)}{where}", file=sys.stderr)
        raise SystemExit(EpmqError.exit_code) from None
    finally:  # main() called from Python (tests) leaves the caller's handlers as they were
        for stop_signal, handler in previous.items():
            signal.signal(stop_signal, handler)


__all__ = ["app", "main"]
