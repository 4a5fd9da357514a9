"""The results of one experiment: every evaluated model on every task, as JSON.

One :class:`Results` object holds the suite, its ordered tasks, the exact settings, seed,
versions, machine and timings, one :class:`Row` per evaluated model and named sweeps (at least
the α sweep, :data:`ALPHA_SWEEP`). Accuracies are fractions in [0, 1]; the report shows them
as percentages, and differences as percentage points.

Row kinds:

- ``pretrained``: linear-probe heads on the pretrained encoder.
- ``expert``: each task's own expert on its own task, one row holding all tasks.
- ``merged``: a full-precision merge (``merge`` names the method).
- ``target``: E-PMQ's continuous target W* before rounding, a merge in its own right (it may
  record ``bits``/``group_size`` when its calibration inputs came from the quantized model).
- ``quantized``: a merge rounded by ``quantizer`` at ``bits`` (per channel or ``group_size``).

A solver's row records the parameters it ran with (``params``, as the solver declares them,
:mod:`epmq.quant.solvers`) and its X-source; a row made for a study (``study``, e.g. the
X-source study) is set apart from the main table's rows. Schema version 1 files (``alpha`` and
``target`` as row fields) are read and upgraded; other versions are refused by name.

:meth:`Results.to_json` / :meth:`Results.from_json` round-trip the object; a file that does not
match the schema raises :class:`~epmq.errors.EpmqError` naming the file and the field.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import Field, ValidationError, model_validator

from epmq.errors import EpmqError
from epmq.eval.provenance import (
    Machine,
    StrictModel,
    Versions,
    collect_machine,
    collect_versions,
)
from epmq.eval.results_v1 import from_version_1

RowKind = Literal["pretrained", "expert", "merged", "target", "quantized"]
Quantizer = str  # a solver's registered name (epmq.quant.solvers); any name still renders
XSource = Literal["quantized", "merged", "expert"]
ParamValue = bool | int | float | str  # a solver parameter's value (epmq.params.Param)

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
ALPHA_SWEEP = "alpha"

Accuracy = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Bits = Annotated[int, Field(ge=1, le=16)]
GroupSize = Annotated[int, Field(ge=1)]


class TaskWeights(StrictModel):
    """The per-task weights ``w_i`` a row's model was calibrated with, how they were chosen
    (``quantization.task_weights``: ``uniform``, ``auto`` or ``given``) and, for ``auto``,
    the distances ``d_i`` of each round (round 0: the full-precision merge's)."""

    setting: Literal["uniform", "auto", "given"]
    weights: dict[str, Annotated[float, Field(ge=0.0, allow_inf_nan=False)]]
    rounds: list[dict[str, float]] = Field(default_factory=list)


class Row(StrictModel):
    """One evaluated model and its accuracy on every task."""

    name: str = Field(min_length=1)
    kind: RowKind
    merge: str | None = None
    quantizer: Quantizer | None = None
    bits: Bits | None = None
    group_size: GroupSize | None = None
    x_source: XSource | None = None
    params: dict[str, ParamValue] = Field(default_factory=dict)
    study: str | None = None
    task_weights: TaskWeights | None = None  # None: not recorded (every task 1)
    accuracy: dict[str, Accuracy]
    size_bytes: Annotated[int, Field(ge=0)] | None = None
    seconds: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    notes: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Row:
        def bad(why: str) -> ValueError:
            return ValueError(f"row {self.name!r} (kind {self.kind!r}): {why}")

        if self.kind in ("pretrained", "expert") and self.merge is not None:
            raise bad("merge must be null")
        if self.kind in ("pretrained", "expert", "merged") and self.params:
            raise bad("params are only for quantized and target rows")
        if self.kind in ("merged", "target", "quantized") and not self.merge:
            raise bad("merge must name the merging method")
        if self.kind == "quantized":
            if self.quantizer is None or self.bits is None:
                raise bad("quantizer and bits are required")
        elif self.quantizer is not None and self.kind != "target":
            raise bad("quantizer is only for quantized and target rows")
        elif self.kind != "target" and (self.bits is not None or self.group_size is not None):
            # A target row may record the bit setting whose calibration produced its W*.
            raise bad("bits and group_size are only for quantized and target rows")
        _check_params(self.quantizer, self.params)
        return self

    @property
    def is_primary(self) -> bool:
        """True unless this row was made for a study (an X-source study, an ablation)."""
        return self.study is None


class SweepPoint(StrictModel):
    """One point of a sweep: a setting and the average accuracy it reached."""

    merge: str | None = None
    bits: Bits | None = None
    group_size: GroupSize | None = None
    quantizer: Quantizer | None = None
    x_source: XSource | None = None
    params: dict[str, ParamValue] = Field(default_factory=dict)
    average: Accuracy

    @model_validator(mode="after")
    def _declared(self) -> SweepPoint:
        _check_params(self.quantizer, self.params)
        return self


class Results(StrictModel):
    """Everything one experiment measured; see the module docstring."""

    schema_version: Literal[2] = SCHEMA_VERSION
    suite: str = Field(min_length=1)
    tasks: list[str] = Field(min_length=1)
    settings: dict[str, Any] = Field(default_factory=dict)
    seed: int
    versions: Versions
    created: datetime
    machine: Machine
    timings: dict[str, Annotated[float, Field(ge=0.0, allow_inf_nan=False)]] = Field(
        default_factory=dict
    )
    rows: list[Row] = Field(default_factory=list)
    sweeps: dict[str, list[SweepPoint]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "schema_version" not in data:
            return data
        version = data["schema_version"]
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"schema_version {version!r} is not one this epmq reads "
                f"({', '.join(map(str, READABLE_VERSIONS))}); use the epmq that wrote it"
            )
        return from_version_1(data) if version == 1 else data

    @model_validator(mode="after")
    def _consistent(self) -> Results:
        _check_rows(self.tasks, self.rows)
        return self

    # ---- construction and JSON ------------------------------------------------------------

    @classmethod
    def new(cls, suite: str, tasks: list[str], settings: dict[str, Any], seed: int) -> Results:
        """Start an empty results object stamped with versions, machine and time of now."""
        return cls(
            suite=suite,
            tasks=list(tasks),
            settings=dict(settings),
            seed=seed,
            versions=collect_versions(),
            created=datetime.now(timezone.utc),
            machine=collect_machine(),
        )

    def to_json(self) -> str:
        """The results as indented JSON text."""
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "<results>") -> Results:
        """Parse JSON text; errors name ``source`` and the offending field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise EpmqError(
                f"{source}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
            ) from None
        except RecursionError:
            raise EpmqError(f"{source}: not valid JSON (nested too deeply)") from None
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise EpmqError(_describe(err, source)) from None

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the JSON atomically; refuses to overwrite unless ``force``."""
        from epmq.atomic import write_text

        return write_text(path, self.to_json(), force=force)

    def add(self, row: Row) -> Row:
        """Append ``row``, checking its tasks and name against the rest; returns it."""
        try:
            _check_rows(self.tasks, [*self.rows, row])
        except ValueError as err:
            raise EpmqError(f"results of suite {self.suite!r}: {err}") from None
        self.rows.append(row)
        return row

    # ---- lookups --------------------------------------------------------------------------

    def find(self, **criteria: object) -> list[Row]:
        """Rows whose fields equal all the criteria, e.g. ``find(kind="quantized", bits=4)``."""
        unknown = set(criteria) - set(Row.model_fields)
        if unknown:
            raise TypeError(f"unknown row fields {sorted(unknown)}")
        return [r for r in self.rows if all(getattr(r, k) == v for k, v in criteria.items())]

    def row(self, name: str) -> Row:
        """The row called ``name``."""
        for r in self.rows:
            if r.name == name:
                return r
        raise EpmqError(f"results of suite {self.suite!r} have no row named {name!r}")

    def expert_row(self) -> Row | None:
        """The experts' row (each task's own expert on its own task), if evaluated."""
        rows = self.find(kind="expert")
        return rows[0] if rows else None

    def merges(self) -> list[str]:
        """Merging methods in the order they first appear in the rows."""
        seen: dict[str, None] = {}
        for r in self.rows:
            if r.merge is not None:
                seen.setdefault(r.merge, None)
        return list(seen)

    def bit_settings(self, merge: str | None = None) -> list[tuple[int, int | None]]:
        """(bits, group_size) of quantized rows, most bits first, per-channel before groups."""
        found = {
            (r.bits, r.group_size)
            for r in self.find(kind="quantized")
            if r.bits is not None and (merge is None or r.merge == merge)
        }
        return sorted(found, key=lambda s: (-s[0], s[1] or 0))

    def quantized(
        self,
        merge: str,
        quantizer: Quantizer,
        bits: int,
        group_size: int | None,
        *,
        primary: bool = True,
    ) -> Row | None:
        """The first matching quantized row (the primary variant unless ``primary=False``)."""
        rows = self.find(
            kind="quantized", merge=merge, quantizer=quantizer, bits=bits, group_size=group_size
        )
        if primary:
            rows = [r for r in rows if r.is_primary]
        return rows[0] if rows else None


class Normalized(NamedTuple):
    """Accuracy divided by the experts' accuracy, per task and averaged."""

    per_task: dict[str, float]
    mean: float


def average(row: Row) -> float:
    """Mean accuracy over the row's tasks (a fraction in [0, 1])."""
    return sum(row.accuracy.values()) / len(row.accuracy)


def normalized(row: Row, expert_row: Row) -> Normalized:
    """``row``'s accuracy over the experts' accuracy on each task, and the mean of those."""
    per_task: dict[str, float] = {}
    for task, acc in row.accuracy.items():
        ref = expert_row.accuracy.get(task)
        if ref is None:
            raise EpmqError(f"row {expert_row.name!r} has no accuracy for task {task!r}")
        if ref <= 0.0:
            raise EpmqError(
                f"row {expert_row.name!r}: expert accuracy on task {task!r} is 0;"
                " normalised accuracy is undefined"
            )
        per_task[task] = acc / ref
    return Normalized(per_task, sum(per_task.values()) / len(per_task))


def load_results(path: str | Path) -> Results:
    """Read a results JSON file; a missing or invalid file raises :class:`EpmqError`."""
    path = Path(path)
    if not path.is_file():
        raise EpmqError(f"results file {path} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EpmqError(f"{path}: cannot read results file ({err})") from None
    return Results.from_json(text, source=str(path))


def _check_rows(tasks: list[str], rows: list[Row]) -> None:
    """Unique tasks and row names, every row holding exactly the tasks, at most one expert."""
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks are not unique: {tasks}")
    names: set[str] = set()
    for row in rows:
        if row.name in names:
            raise ValueError(f"row name {row.name!r} appears twice")
        names.add(row.name)
        missing = [t for t in tasks if t not in row.accuracy]
        extra = [t for t in row.accuracy if t not in tasks]
        if missing or extra:
            raise ValueError(
                f"row {row.name!r}: accuracy must hold exactly the tasks {tasks}"
                f" (missing {missing}, unknown {extra})"
            )
    if sum(row.kind == "expert" for row in rows) > 1:
        raise ValueError("at most one row may have kind 'expert' (it holds all tasks)")


def _check_params(quantizer: str | None, params: dict[str, ParamValue]) -> None:
    """A registered solver's parameters must be declared and in range; the parameters of a
    solver this epmq does not know are kept as written."""
    from epmq.quant.solvers import get_solver, list_solvers

    if quantizer not in list_solvers():
        return
    solver = get_solver(quantizer)
    for name, value in params.items():
        try:
            solver.param(name).check(value, quantizer)
        except EpmqError as exc:
            raise ValueError(str(exc)) from None


def _describe(err: ValidationError, source: str) -> str:
    problems = err.errors()
    parts = []
    for problem in problems[:3]:
        loc = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        msg = str(problem["msg"]).replace("\n", " ").removeprefix("Value error, ")
        parts.append(f"field {loc}: {msg}")
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return f"{source}: invalid results: " + "; ".join(parts) + more


__all__ = [
    "ALPHA_SWEEP",
    "SCHEMA_VERSION",
    "Machine",
    "Normalized",
    "Quantizer",
    "Results",
    "Row",
    "RowKind",
    "SweepPoint",
    "TaskWeights",
    "Versions",
    "XSource",
    "average",
    "collect_machine",
    "collect_versions",
    "load_results",
    "normalized",
]
