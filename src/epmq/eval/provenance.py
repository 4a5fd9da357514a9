"""Where a results file came from: the versions of the software and the machine that produced
it, stamped on every :class:`~epmq.eval.results.Results` when it is started."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A results model: unknown fields are refused."""

    # Validated when built or loaded (and by Results.add); plain attribute assignment is not
    # re-validated, since pydantic would keep a value its model validator rejects.
    model_config = ConfigDict(extra="forbid")


class Versions(StrictModel):
    """Versions of the software that produced the results."""

    epmq: str
    torch: str | None = None
    transformers: str | None = None
    python: str


class Machine(StrictModel):
    """Where the results were produced."""

    cpu_count: int | None = None
    platform: str


def collect_versions() -> Versions:
    """Versions of epmq, torch, transformers and Python installed here."""
    from epmq import __version__

    def version_of(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return Versions(
        epmq=__version__,
        torch=version_of("torch"),
        transformers=version_of("transformers"),
        python=platform.python_version(),
    )


def collect_machine() -> Machine:
    """CPU count and platform string of this machine."""
    return Machine(cpu_count=os.cpu_count(), platform=platform.platform())
