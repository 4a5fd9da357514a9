from pathlib import Path

import pytest

from epmq.errors import EpmqError
from epmq.experiment.config import load_config, parse_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_suite_config_gets_defaults() -> None:
    config = parse_config({"suite": "text8"})
    assert config.quantization.methods == ["rtn", "gptq", "epmq"]
    assert config.quantization.bits == [4, 3]
    assert config.merges[0].method == "task_arithmetic"


def test_user_config_resolves_paths_against_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
base: {path: models/base}
experts:
  - {name: a, path: models/a, task: ta}
tasks:
  - {name: ta, data: data/a.csv, format: csv}
output: {dir: out}
""",
    )
    config = load_config(path)
    assert config.base is not None and config.base.path == tmp_path / "models/base"
    assert config.experts[0].path == tmp_path / "models/a"
    assert config.tasks[0].data == tmp_path / "data/a.csv"
    assert config.output.dir == tmp_path / "out"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("suite: text8\nquantization: {bits: [9]}\n", "quantization.bits: bits must be between 2"),
        ("suite: text8\nmerges: [{metod: ties}]\n", "merges.0.method: Field required"),
        ("suite: text8\nquantization: {x_source: model}\n", "quantization.x_source"),
        ("base: {path: b}\n", "'experts' must list at least one expert"),
        (
            "base: {path: b}\nexperts: [{name: a, path: a, task: nope}]\n",
            "experts.0.task: unknown task 'nope'",
        ),
        ("suite: text8\nbogus: 1\n", "bogus: Extra inputs are not permitted"),
        ("suite: text8\nmerges: [{method: tie}]\n", "merges.0: unknown merge method 'tie'"),
        (
            "suite: text8\nmerges: [{method: ties, params: {densty: 0.2}}]\n",
            "merges.0: method 'ties' has no parameter 'densty'",
        ),
        (
            "suite: text8\nmerges: [{method: ties, params: {density: 2}}]\n",
            "merges.0: method 'ties': parameter 'density' must be in (0.0, 1.0]",
        ),
        ("suite: text8\nevaluation: {dtype: float16}\n", "evaluation.dtype"),
        ("- just\n- a list\n", "expected a mapping"),
        ("suite: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_configs_name_the_field(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(EpmqError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(EpmqError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_configs_validate(path: Path) -> None:
    config = load_config(path)
    assert config.merges and config.quantization.methods


def test_examples_exist() -> None:
    assert {p.stem for p in EXAMPLES} >= {"text8", "clip-vit-b32-8tasks", "flan-t5-base-glue"}


USER_CONFIG = """
base: {path: models/base}
experts:
  - {name: a, path: models/a, task: ta, head: HEAD}
tasks:
  - {name: ta, data: data/a.csv, format: csv}
output: {dir: out}
"""


def test_offload_dir_resolves_against_the_file_and_reaches_the_engine(tmp_path: Path) -> None:
    from epmq.experiment.building import engine_options

    config = load_config(
        _write(tmp_path, "suite: text8\ndevice: cpu\ncalibration: {offload_dir: scratch}\n")
    )
    assert config.calibration.offload_dir == tmp_path / "scratch"
    options = engine_options(config, progress=False)
    assert options.offload_dir == tmp_path / "scratch" and options.device == "cpu"
    assert engine_options(parse_config({"suite": "text8"})).offload_dir is None


def test_expert_head_absolute_or_relative(tmp_path: Path) -> None:
    head = tmp_path / "elsewhere" / "a.safetensors"
    config = load_config(_write(tmp_path, USER_CONFIG.replace("HEAD", str(head))))
    assert config.experts[0].head == head  # an absolute head is kept, not dropped
    config = load_config(_write(tmp_path, USER_CONFIG.replace("HEAD", "heads/a.safetensors")))
    assert config.experts[0].head == tmp_path / "heads/a.safetensors"


def test_same_config_read_from_another_directory_is_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the resume fingerprint holds must not depend on the working directory."""
    (tmp_path / "project").mkdir()
    _write(tmp_path / "project", USER_CONFIG.replace("HEAD", "h.safetensors"))
    monkeypatch.chdir(tmp_path / "project")
    inside = load_config("run.yaml").model_dump(mode="json")
    monkeypatch.chdir(tmp_path)
    beside = load_config("project/run.yaml").model_dump(mode="json")
    monkeypatch.chdir(tmp_path / "project" / ".." / "project")
    dotted = load_config("../project/run.yaml").model_dump(mode="json")
    assert inside == beside == dotted
    assert inside["base"]["path"] == str((tmp_path / "project").resolve() / "models" / "base")


def test_calibration_examples_default_and_task_override() -> None:
    from epmq.experiment.folders import calib_size

    tasks = [
        {"name": "a", "data": "a.csv", "format": "csv"},
        {"name": "b", "data": "b.csv", "format": "csv", "calib_size": 9},
    ]
    experts = [{"name": t, "path": t, "task": t} for t in "ab"]
    common = {"base": {"path": "m"}, "experts": experts, "tasks": tasks}
    plain = parse_config(common)
    assert [calib_size(t, plain) for t in plain.tasks] == [128, 9]
    chosen = parse_config({**common, "calibration": {"examples": 32}})
    assert [calib_size(t, chosen) for t in chosen.tasks] == [32, 9]
