"""Results files of schema version 1, read as version 2.

Version 1 rows and sweep points carried E-PMQ's ``alpha`` and ``target`` as fields of their
own; version 2 records every solver's parameters in ``params`` and marks the rows made for a
study (``study``). Version 1 called a row an ablation when its targets were the merged weights
or its X-source was not ``quantized`` (then the default): those become study rows.
"""

from __future__ import annotations

from typing import Any


def from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """A version 1 results dict as version 2: ``alpha``/``target`` become ``params``; the rows
    version 1 called ablations (merged targets, an X-source other than ``quantized``) a study."""

    def upgraded(entry: Any, *, row: bool) -> Any:
        if not isinstance(entry, dict):
            return entry
        entry = dict(entry)
        old = {k: entry.pop(k, None) for k in ("alpha", "target")}
        params = {k: v for k, v in old.items() if v is not None}
        params.update(entry.get("params") or {})
        if params:
            entry["params"] = params
        ablation = params.get("target") == "merged" or entry.get("x_source") not in (
            None,
            "quantized",
        )
        if row and ablation:
            entry.setdefault("study", "x_source" if params.get("target") != "merged" else "target")
        return entry

    out = dict(data, schema_version=2)
    if isinstance(data.get("rows"), list):
        out["rows"] = [upgraded(r, row=True) for r in data["rows"]]
    if isinstance(data.get("sweeps"), dict):
        out["sweeps"] = {
            name: [upgraded(p, row=False) for p in points] if isinstance(points, list) else points
            for name, points in data["sweeps"].items()
        }
    return out
