"""Step 5: the per-layer log and the JSON-able record of every solved linear."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger("epmq.calib")


@dataclass
class LayerRecord:
    """Figures of one solved linear layer."""

    name: str
    stage: str
    block: int
    method: str
    shape: tuple[int, int]
    tokens: dict[str, int]
    proxy_loss: float
    damping: float
    damping_retries: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (NaN/Inf losses become None)."""
        data = asdict(self)
        data["shape"] = list(self.shape)
        for key in ("proxy_loss", "damping"):
            value = data[key]
            data[key] = None if value is None or not math.isfinite(value) else float(value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerRecord:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["shape"] = tuple(data["shape"])
        for key in ("proxy_loss", "damping"):
            if data[key] is None:
                data[key] = float("nan")
        return cls(**data)

    def log(self) -> None:
        """One log line: name, loss, damping, time (GPTQModel-style row)."""
        retries = f" (+{self.damping_retries} retries)" if self.damping_retries else ""
        logger.info(
            "%-48s %-7s loss=%-11.4g damp=%.4g%s time=%.2fs",
            self.name,
            self.method,
            self.proxy_loss,
            self.damping,
            retries,
            self.seconds,
        )
