"""The ``epmq`` command line.

One module per sub-command lives in this package (``merge_command.py``, ``demo_command.py``,
...); each registers itself on :data:`epmq.cli.app.app` with ``@app.command()``. Importing this
package imports every ``*_command`` module, so adding a command is adding one file.

Sub-commands are thin shells over the Python API. User mistakes raise
:class:`epmq.errors.EpmqError`; :func:`main` prints them as one line and exits with code 2.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

from epmq.cli.app import app
from epmq.errors import DISK_FULL, EpmqError

for _module in pkgutil.iter_modules(__path__):
    if _module.name.endswith("_command"):
        importlib.import_module(f"{__name__}.{_module.name}")


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        app()
    except EpmqError as err:
        print(f"epmq: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except OSError as err:  # a write that no EpmqError names (a save_pretrained, the journal)
        if err.errno not in DISK_FULL:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"epmq: error: {os.strerror(err.errno)}{where}", file=sys.stderr)
        raise SystemExit(EpmqError.exit_code) from None


__all__ = ["app", "main"]
