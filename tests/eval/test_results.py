"""The results schema: JSON round trip, validation errors, helpers and lookups."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from epmq.errors import EpmqError
from epmq.eval.results import (
    ALPHA_SWEEP,
    Results,
    Row,
    SweepPoint,
    average,
    load_results,
    normalized,
)

TASKS = ["a", "b"]


def acc(x: float, y: float) -> dict[str, float]:
    return {"a": x, "b": y}


def build() -> Results:
    results = Results.new("tiny", TASKS, {"alpha": 0.1, "bits": [4, 3]}, seed=3)
    results.rows = [
        Row(name="pre", kind="pretrained", accuracy=acc(0.5, 0.3)),
        Row(name="exp", kind="expert", accuracy=acc(0.8, 0.6)),
        Row(name="ta", kind="merged", merge="ta", accuracy=acc(0.7, 0.5)),
        Row(
            name="ta-t",
            kind="target",
            merge="ta",
            quantizer="epmq",
            params={"alpha": 0.1},
            accuracy=acc(0.75, 0.55),
        ),
        Row(
            name="ta-g3",
            kind="quantized",
            merge="ta",
            quantizer="gptq",
            bits=3,
            accuracy=acc(0.4, 0.2),
        ),
        Row(
            name="ta-g4",
            kind="quantized",
            merge="ta",
            quantizer="gptq",
            bits=4,
            group_size=128,
            accuracy=acc(0.6, 0.4),
        ),
        Row(
            name="ta-e4",
            kind="quantized",
            merge="ta",
            quantizer="epmq",
            bits=4,
            group_size=128,
            x_source="quantized",
            params={"alpha": 0.1},
            accuracy=acc(0.7, 0.5),
            size_bytes=1234,
            seconds=2.5,
            notes="primary",
        ),
        Row(
            name="ta-e4-m",
            kind="quantized",
            merge="ta",
            quantizer="epmq",
            bits=4,
            group_size=128,
            params={"alpha": 0.1, "target": "merged"},
            study="target",
            accuracy=acc(0.6, 0.41),
        ),
        Row(name="ties", kind="merged", merge="ties", accuracy=acc(0.72, 0.52)),
        Row(
            name="ties-r4",
            kind="quantized",
            merge="ties",
            quantizer="rtn",
            bits=4,
            accuracy=acc(0.5, 0.3),
        ),
    ]
    results.sweeps[ALPHA_SWEEP] = [
        SweepPoint(
            merge="ta", bits=4, group_size=128, quantizer="epmq", params={"alpha": a}, average=v
        )
        for a, v in ((0.0, 0.55), (0.1, 0.6), (1.0, 0.52))
    ]
    results.timings["quantize"] = 4.0
    return results


def test_new_stamps_versions_machine_and_time() -> None:
    results = build()
    assert results.versions.epmq and results.versions.python.count(".") == 2
    assert results.versions.torch is not None
    assert results.machine.platform and results.created.tzinfo is not None


def test_json_round_trip_is_exact(tmp_path: Path) -> None:
    results = build()
    again = Results.from_json(results.to_json())
    assert again == results
    assert again.rows[6].notes == "primary" and again.rows[6].size_bytes == 1234
    path = results.save(tmp_path / "results.json")
    assert load_results(path) == results
    data = json.loads(path.read_text())
    assert data["schema_version"] == 2 and data["tasks"] == TASKS
    assert data["sweeps"]["alpha"][0] == {
        "merge": "ta",
        "bits": 4,
        "group_size": 128,
        "quantizer": "epmq",
        "x_source": None,
        "params": {"alpha": 0.0},
        "average": 0.55,
    }
    with pytest.raises(EpmqError, match="already exists"):
        results.save(path)


def test_average_and_normalized() -> None:
    results = build()
    assert average(results.row("ta")) == pytest.approx(0.6)
    norm = normalized(results.row("ta"), results.row("exp"))
    assert norm.per_task == pytest.approx({"a": 0.7 / 0.8, "b": 0.5 / 0.6})
    assert norm.mean == pytest.approx((0.875 + 0.5 / 0.6) / 2)
    zero = Row(name="z", kind="expert", accuracy=acc(0.0, 0.6))
    with pytest.raises(EpmqError, match="task 'a'"):
        normalized(results.row("ta"), zero)


def test_lookups() -> None:
    results = build()
    assert results.merges() == ["ta", "ties"]
    assert results.expert_row() is not None and results.expert_row().name == "exp"
    assert [r.name for r in results.find(kind="merged")] == ["ta", "ties"]
    assert [r.name for r in results.find(quantizer="epmq", bits=4)] == ["ta-e4", "ta-e4-m"]
    assert results.bit_settings() == [(4, None), (4, 128), (3, None)]
    assert results.bit_settings("ta") == [(4, 128), (3, None)]
    assert results.quantized("ta", "epmq", 4, 128).name == "ta-e4"
    assert results.quantized("ta", "epmq", 4, None) is None
    assert not results.row("ta-e4-m").is_primary
    with pytest.raises(EpmqError, match="no row named 'nope'"):
        results.row("nope")
    with pytest.raises(TypeError, match="colour"):
        results.find(colour="red")


def broken(path: Path, edit: Any) -> Path:
    data = json.loads(build().to_json())
    edit(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("edit", "field", "why"),
    [
        (lambda d: d["rows"][2]["accuracy"].update(a=70.0), "rows.2.accuracy.a", "less than"),
        (lambda d: d["rows"][2]["accuracy"].pop("b"), "(top level)", "missing ['b']"),
        (lambda d: d["rows"][2]["accuracy"].update(c=0.1), "(top level)", "unknown ['c']"),
        (lambda d: d["rows"][4].update(bits=None), "rows.4", "quantizer and bits"),
        (lambda d: d["rows"][2].update(merge=None), "rows.2", "merge must name"),
        (lambda d: d["rows"][0].update(bits=4), "rows.0", "bits and group_size"),
        (lambda d: d["rows"][1].update(kind="teacher"), "rows.1.kind", "pretrained"),
        (lambda d: d["rows"][3].update(name="ta"), "(top level)", "appears twice"),
        (lambda d: d["rows"][0].update(kind="expert"), "(top level)", "at most one"),
        (lambda d: d["rows"][0].update(acuracy={}), "rows.0.acuracy", "not permitted"),
        (lambda d: d["sweeps"]["alpha"][0]["params"].update(alpha=-1), "sweeps.alpha.0", "alpha"),
        (lambda d: d["rows"][7]["params"].update(alhpa=1), "rows.7", "no parameter 'alhpa'"),
        (lambda d: d.pop("seed"), "seed", "required"),
        (lambda d: d.update(tasks=["a", "a"]), "(top level)", "not unique"),
        (lambda d: d.update(schema_version=3), "(top level)", "schema_version 3"),
    ],
)
def test_invalid_files_name_the_file_and_field(
    tmp_path: Path, edit: Any, field: str, why: str
) -> None:
    path = broken(tmp_path / "results.json", edit)
    with pytest.raises(EpmqError) as info:
        load_results(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid results: field {field}: ")
    assert why in message and "\n" not in message


def test_nan_accuracy_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "nan.json"
    path.write_text(build().to_json().replace('"a": 0.7,', '"a": NaN,', 1))
    with pytest.raises(EpmqError, match=r"field rows\.2\.accuracy\.a"):
        load_results(path)
    assert math.isnan(json.loads(path.read_text())["rows"][2]["accuracy"]["a"])


def test_missing_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(EpmqError, match="does not exist"):
        load_results(tmp_path / "missing.json")
    with pytest.raises(EpmqError, match="does not exist or is not a file"):
        load_results(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  'single quotes': 1}")
    with pytest.raises(EpmqError, match=r"bad\.json: not valid JSON \(line 2, column 3"):
        load_results(bad)


def test_add_validates_the_new_row() -> None:
    results = build()
    added = results.add(
        Row(
            name="ties-g4",
            kind="quantized",
            merge="ties",
            quantizer="gptq",
            bits=4,
            accuracy=acc(0.6, 0.4),
        )
    )
    assert results.rows[-1] is added or results.rows[-1] == added
    with pytest.raises(EpmqError, match="appears twice"):
        results.add(Row(name="ta", kind="merged", merge="ta", accuracy=acc(0.1, 0.1)))
    with pytest.raises(EpmqError, match="missing"):
        results.add(Row(name="new", kind="merged", merge="x", accuracy={"a": 0.1}))
    assert [r.name for r in results.rows].count("ta") == 1
    assert len(results.rows) == 11


def test_version_1_files_are_upgraded(tmp_path: Path) -> None:
    """A results.json written by schema version 1 (α and target as row fields) still loads:
    the fields become the row's solver parameters, its ablations a study."""
    data = json.loads(build().to_json())
    data["schema_version"] = 1
    for row in data["rows"]:
        params = row.pop("params")
        row.pop("study")
        row.update(alpha=params.get("alpha"), target=params.get("target"))
    for point in data["sweeps"]["alpha"]:
        point.update(alpha=point.pop("params")["alpha"], target=None)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    again = load_results(path)
    assert again.schema_version == 2
    assert again.rows[7].params == {"alpha": 0.1, "target": "merged"}
    assert again.rows[7].study == "target" and not again.rows[7].is_primary
    assert again.rows[6].params == {"alpha": 0.1} and again.rows[6].is_primary
    assert [p.params for p in again.sweeps[ALPHA_SWEEP]] == [
        {"alpha": 0.0},
        {"alpha": 0.1},
        {"alpha": 1.0},
    ]
