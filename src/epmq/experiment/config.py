"""Pipeline configs: one YAML file describes a whole post-merge quantization experiment.

The schema is validated by pydantic; every error is reported as one line naming the file and
the field (``run.yaml: quantization.bits.0: bits must be between 2 and 8``). The
``quantization`` block's schema is in :mod:`epmq.experiment.quantization_spec`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from epmq.calib.task_weights import check_task_weights
from epmq.devices import DEVICE_CHOICES
from epmq.errors import EpmqError
from epmq.experiment.quantization_spec import QuantizationSpec
from epmq.experiment.quantization_spec import StrictSpec as _Strict
from epmq.models.registry import families

DataFormat = Literal["csv", "jsonl", "npz", "imagefolder", "hf_disk"]
ExportFormat = Literal["compressed-tensors", "gptq", "dequantized"]


class BaseModelSpec(_Strict):
    """The pretrained model every expert was fine-tuned from (a local Hugging Face folder)."""

    path: Path


class ExpertSpec(_Strict):
    """One fine-tuned expert: a local folder, the task it was trained for, and its head."""

    name: str
    path: Path
    task: str
    head: Path | None = None  # default: <path>/head.safetensors
    #: what a linear head file reads (its family's ``head_inputs``: text ``mean`` | ``cls`` |
    #: ``pooler``; images ``pooled`` | ``normalized`` | ``projected`` | ``mean_patch``);
    #: None: the family's default (text: the experiment's ``pooling``)
    head_input: str | None = None


class TaskSpec(_Strict):
    """One task's labelled data, how much of it calibrates and evaluates, and how the model
    family reads it (prompt and label words for T5 / causal LMs, templates for CLIP)."""

    name: str
    data: Path
    format: DataFormat
    text_column: str = "text"
    label_column: str = "label"
    image_column: str = "image"
    classes: list[str] | None = None
    calib_size: int | None = Field(None, ge=1)  # None: calibration.examples, else 128
    test_size: int | None = Field(None, ge=1)
    max_length: int = Field(128, ge=1)
    prompt: str | None = None
    label_words: list[str] | None = None
    templates: list[str] | None = None
    allow_pickle: bool = False  # npz object arrays are unpickled only then (unsafe)

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, prompt: str | None) -> str | None:
        if prompt is not None and "{text}" not in prompt:
            raise ValueError("prompt must contain '{text}' where the example's text goes")
        return prompt

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str] | None) -> list[str] | None:
        for template in templates or []:
            if "{}" not in template:
                raise ValueError(f"template {template!r} must contain '{{}}' for the class name")
        return templates


class ImageSpec(_Strict):
    """Image preprocessing for models whose folder has no ``preprocessor_config.json``."""

    size: int = Field(224, ge=1)
    crop_size: int | None = Field(None, ge=1)
    mean: list[float] | None = None
    std: list[float] | None = None


class CalibrationSpec(_Strict):
    """How many calibration examples each task gives and how they are batched."""

    batch_size: int = Field(16, ge=1)
    #: examples per task (a task's ``calib_size`` overrides it); None: 128 for a user's
    #: tasks, a built-in suite's calibration split as prepared; a suite tops a larger number
    #: up from its training split (:meth:`epmq.suites.task.Task.calibration_texts`)
    examples: int | None = Field(None, ge=1)
    #: keep the activations between blocks in files in a private folder there (one task in
    #: memory at a time; deleted when each calibration ends); same results, slower
    offload_dir: Path | None = None


class MergeSpec(_Strict):
    """One merge method and its parameters (see ``epmq.merging.list_methods``)."""

    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    include: list[str] | None = None
    exclude: list[str] | None = None

    @property
    def label(self) -> str:
        return self.method


class EvaluationSpec(_Strict):
    batch_size: int = Field(64, ge=1)
    max_test: int | None = Field(None, ge=1)
    # Precision of evaluation forwards: bfloat16 runs them under CPU/GPU autocast (matmuls in
    # bfloat16, fast on CPUs with AMX / AVX-512 BF16); calibration always stays float32.
    dtype: Literal["float32", "bfloat16"] = "float32"


class OutputSpec(_Strict):
    dir: Path = Path("runs/experiment")
    export: list[ExportFormat] = Field(default_factory=list)
    force: bool = False


class ExperimentConfig(_Strict):
    """A whole experiment: models and tasks (or a built-in suite), merges, quantizers, outputs."""

    name: str = "experiment"
    seed: int = 0
    suite: str | None = None
    #: a model family's name (:func:`epmq.models.registry.families`); None: from the base
    family: str | None = None
    pooling: Literal["mean", "cls"] = "mean"
    #: a task model's pooler (BERT's dense + tanh on the first token) is part of its head, one
    #: per task; True merges the experts' poolers with the backbone instead
    merge_pooler: bool = False
    image: ImageSpec | None = None
    #: where calibration and evaluation run: auto (a CUDA GPU when present), cpu, cuda[:N];
    #: the models wait in CPU memory and one block at a time is onloaded (calib/onload.py)
    device: str = "auto"
    #: the dtype base, experts and merges are held and streamed in (statistics and solves stay
    #: float32; merges are computed in float32 and stored in it)
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    base: BaseModelSpec | None = None
    experts: list[ExpertSpec] = Field(default_factory=list)
    tasks: list[TaskSpec] = Field(default_factory=list)
    merges: list[MergeSpec] = Field(
        default_factory=lambda: [MergeSpec(method="task_arithmetic", params={"scale": 0.3})]
    )
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    _source: Path | None = PrivateAttr(default=None)  # the YAML file, when read from one

    def where(self, field: str) -> str:
        """``field`` prefixed with the config file it came from (for one-line errors)."""
        return f"{self._source or 'config'}: {field}"

    def inputs(self) -> list[tuple[str, Path]]:
        """Every file and folder the experiment reads, labelled (for
        :func:`epmq.atomic.refuse_overlap`): the config file, base, experts, heads, task data."""
        found: list[tuple[str, Path]] = []
        if self._source is not None:
            found.append(("config file", self._source))
        if self.base is not None:
            found.append(("base model", self.base.path))
        for expert in self.experts:
            found.append((f"expert {expert.name}", expert.path))
            if expert.head is not None:
                found.append((f"head of expert {expert.name}", expert.head))
        found.extend((f"data of task {task.name}", task.data) for task in self.tasks)
        return found

    @model_validator(mode="after")
    def _merges_valid(self) -> ExperimentConfig:
        """Every merge names a known method with valid parameters (before any work)."""
        from epmq.merging import get_method

        for i, merge in enumerate(self.merges):
            try:
                get_method(merge.method).resolve(merge.params, len(self.experts) or None)
            except EpmqError as exc:
                raise ValueError(f"merges.{i}: {exc}") from None
        return self

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str | None) -> str | None:
        known = families()
        if value is not None and value not in known:
            raise ValueError(f"unknown model family {value!r}; choose one of {', '.join(known)}")
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        text = value.strip().lower()
        if text not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", text):
            raise ValueError(f"device must be {DEVICE_CHOICES}, got {value!r}")
        return text

    @model_validator(mode="after")
    def _models_and_tasks_agree(self) -> ExperimentConfig:
        if self.suite is not None:
            if self.base is not None or self.experts or self.tasks:
                raise ValueError("give either 'suite' or 'base'/'experts'/'tasks', not both")
            return self
        if self.base is None:
            raise ValueError("'base' is required when no built-in 'suite' is named")
        if not self.experts:
            raise ValueError("'experts' must list at least one expert")
        task_names = [t.name for t in self.tasks]
        if len(set(task_names)) != len(task_names):
            raise ValueError(f"task names must be unique, got {task_names}")
        for i, expert in enumerate(self.experts):
            if expert.task not in task_names:
                raise ValueError(
                    f"experts.{i}.task: unknown task '{expert.task}' (tasks: {task_names})"
                )
        by_task = [e.task for e in self.experts]
        for i, task in enumerate(self.tasks):
            if task.name not in by_task:
                raise ValueError(f"tasks.{i}: task '{task.name}' has no expert")
            if by_task.count(task.name) > 1:
                raise ValueError(f"tasks.{i}: task '{task.name}' has more than one expert")
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            raise ValueError(f"expert names must be unique, got {names}")
        try:
            check_task_weights(self.quantization.task_weights, task_names)
        except EpmqError as exc:
            raise ValueError(f"quantization.task_weights: {exc}") from None
        return self


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def parse_config(data: Any, source: str = "config") -> ExperimentConfig:
    """Validate a config mapping; errors name ``source`` and the field."""
    if not isinstance(data, dict):
        raise EpmqError(f"{source}: expected a mapping of fields at the top level")
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise EpmqError(f"{source}: {_describe(err)}") from None


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML config; relative paths resolve against the file's folder, to
    absolute paths (the same config reads the same from any working directory)."""
    path = Path(path)
    if not path.is_file():
        raise EpmqError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise EpmqError(f"{path}: not valid YAML{where}") from None
    except UnicodeDecodeError as err:
        raise EpmqError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except RecursionError:
        raise EpmqError(f"{path}: not valid YAML (nested too deeply)") from None
    config = parse_config(data, source=str(path))
    config._source = path
    return _resolve_paths(config, path.resolve().parent)


def _resolve_paths(config: ExperimentConfig, root: Path) -> ExperimentConfig:
    def resolve(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else root / p

    if config.base is not None:
        config.base.path = resolve(config.base.path)
    for expert in config.experts:
        expert.path = resolve(expert.path)
        if expert.head is not None:
            expert.head = resolve(expert.head)
    for task in config.tasks:
        task.data = resolve(task.data)
    config.output.dir = resolve(config.output.dir)
    if config.calibration.offload_dir is not None:
        config.calibration.offload_dir = resolve(config.calibration.offload_dir)
    return config
