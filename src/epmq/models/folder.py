"""Reading a local Hugging Face model folder's ``config.json`` with errors that name it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from epmq.errors import EpmqError


def read_config(folder: str | Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict (:class:`EpmqError` naming what is wrong)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise EpmqError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise EpmqError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise EpmqError(f"{config_file} does not hold a JSON object")
    return config
