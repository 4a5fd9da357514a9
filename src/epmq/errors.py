"""The one exception type for user mistakes.

Anything a user can get wrong (a missing file, a bad config field, an unknown method, a tensor
that does not match) raises :class:`EpmqError` with a message that names the file, field or
tensor. The command line prints that message on one line and exits with code 2; everything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno

#: ``OSError.errno`` of a full disk or an exhausted quota: the user's to fix, not a bug
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class EpmqError(Exception):
    """A user-facing error: the message names what is wrong and where."""

    exit_code: int = 2


class Stopped(BaseException):
    """The command line was stopped by a signal (SIGINT, SIGTERM): raised by its handler so the
    run unwinds as on any error (partial outputs removed, a resumable one kept), then reported on
    one line with exit code 128 + the signal's number. A ``BaseException``, like
    ``KeyboardInterrupt``, so that ``except Exception`` does not swallow it."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")
