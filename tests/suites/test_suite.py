"""The suite API on the tiny stand-in suite: prepare, cache, expert format, calibration."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from epmq.errors import EpmqError
from epmq.suites import Suite, SuiteModels, get_suite, list_suites
from epmq.suites import suite as suite_module


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Suite, SuiteModels]:
    torch.set_num_threads(1)
    suite = get_suite("tiny", cache_dir=tmp_path_factory.mktemp("cache"))
    return suite, suite.prepare(progress=False)


def test_registry() -> None:
    assert {"text8", "tiny"} <= set(list_suites())
    with pytest.raises(EpmqError, match="unknown suite 'nope'"):
        get_suite("nope")


def test_tasks_and_base(prepared: tuple[Suite, SuiteModels]) -> None:
    suite, _ = prepared
    assert suite.name == "tiny"
    assert [t.name for t in suite.tasks] == ["tiny_topic", "tiny_sentiment"]
    for task in suite.tasks:
        assert len(task.test.texts) == suite.settings["n_test"]
        assert len(task.calib.texts) == suite.settings["n_calib"]
        assert not set(task.train.texts) & set(task.test.texts)
    assert (suite.base_dir / "config.json").is_file()
    base = suite.load_encoder()
    assert base.config.hidden_size == 32 and base.config.num_hidden_layers == 2
    with pytest.raises(EpmqError, match="no task 'nope'"):
        suite.task("nope")


def test_expert_folder_format(prepared: tuple[Suite, SuiteModels]) -> None:
    suite, models = prepared
    assert set(models.expert_dirs) == {"tiny_topic", "tiny_sentiment"}
    for name, folder in models.expert_dirs.items():
        assert folder.parent.parent == suite.cache_path
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
        tensors = load_file(str(folder / "head.safetensors"))
        n_classes = suite.task(name).num_classes
        assert tensors["weight"].shape == (n_classes, 32) and tensors["bias"].shape == (n_classes,)
        head = suite.load_head(folder)
        assert torch.equal(head.weight, tensors["weight"])
        encoder = suite.load_encoder(folder)
        base = suite.load_encoder()
        assert set(encoder.state_dict()) == set(base.state_dict())
        moved = [
            k for k, v in encoder.state_dict().items() if not torch.equal(v, base.state_dict()[k])
        ]
        assert moved and not any(k.startswith("embeddings.") for k in moved)  # frozen
        assert models.records[name]["steps"] == suite.settings["steps"]
    # the folder carries its tokenizer: users can load an expert without the suite
    from epmq.eval.accuracy import tokenizer_for

    tokenizer = tokenizer_for(suite.load_encoder(models.expert_dirs["tiny_topic"]))
    assert tokenizer("cat")["input_ids"] == suite.tokenizer("cat")["input_ids"]


def test_experts_learn_and_probes_exist(prepared: tuple[Suite, SuiteModels]) -> None:
    suite, models = prepared
    for name, folder in models.expert_dirs.items():
        acc = suite.evaluate(suite.load_encoder(folder), {name: suite.load_head(folder)})
        chance = 1 / suite.task(name).num_classes
        assert acc[name] > chance + 0.2, (name, acc)
    probe_acc = suite.evaluate(suite.load_encoder(), models.probe_heads)
    assert set(probe_acc) == {"tiny_topic", "tiny_sentiment"}
    assert all(0.0 <= a <= 1.0 for a in probe_acc.values())


def test_second_prepare_reuses(
    prepared: tuple[Suite, SuiteModels], monkeypatch: pytest.MonkeyPatch
) -> None:
    suite, models = prepared

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained again")

    monkeypatch.setattr(suite_module, "train_expert", fail)
    monkeypatch.setattr(suite_module, "train_probe", fail)
    again = get_suite("tiny", cache_dir=suite.cache_root).prepare(progress=False)
    assert again.expert_dirs == models.expert_dirs
    for name, head in again.probe_heads.items():
        assert torch.equal(head.weight, models.probe_heads[name].weight)


def test_settings_key_the_cache(tmp_path: Path) -> None:
    base = get_suite("tiny", cache_dir=tmp_path)
    assert get_suite("tiny", cache_dir=tmp_path).key == base.key
    changed = [
        get_suite("tiny", cache_dir=tmp_path, steps=7),
        get_suite("tiny", cache_dir=tmp_path, seed=1),
        get_suite("tiny", cache_dir=tmp_path, n_train=100),
        get_suite("tiny", cache_dir=tmp_path, quick=True),
    ]
    keys = {s.key for s in changed}
    assert base.key not in keys and len(keys) == 4
    assert changed[0].settings["steps"] == 7
    assert changed[0].cache_path != base.cache_path
    with pytest.raises(EpmqError, match="unknown suite setting 'stepz'"):
        get_suite("tiny", stepz=3)
    with pytest.raises(EpmqError, match="must be int"):
        get_suite("tiny", steps="many")


def test_cache_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPMQ_CACHE", str(tmp_path))
    suite = get_suite("tiny")
    assert suite.cache_path == tmp_path / "suites" / "tiny" / suite.key


def test_failed_training_leaves_no_expert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    suite = get_suite("tiny", cache_dir=tmp_path, steps=2, n_train=32, n_test=8, n_calib=4)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(suite_module.classifier, "save_expert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        suite.prepare(progress=False)
    experts = suite.cache_path / "experts"
    assert not experts.exists() or not any(experts.iterdir())


def test_calibration_batches(prepared: tuple[Suite, SuiteModels]) -> None:
    suite, _ = prepared
    batches = suite.calibration_batches("tiny_topic", batch_size=10)
    n_calib = suite.settings["n_calib"]
    assert [b["input_ids"].shape[0] for b in batches] == [10, 10, 10, n_calib - 30]
    assert sum(int(b["attention_mask"][:, 0].sum()) for b in batches) == n_calib
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
        assert batch["attention_mask"][:, -1].any()  # padded only to the batch's longest
    lengths = [int(b["attention_mask"].sum(1).max()) for b in batches]
    assert lengths == sorted(lengths, reverse=True)
    encoder = suite.load_encoder()
    with torch.inference_mode():
        out = encoder(**batches[0]).last_hidden_state
    assert out.shape[:2] == batches[0]["input_ids"].shape
    with pytest.raises(EpmqError, match="batch_size"):
        suite.calibration_batches("tiny_topic", batch_size=0)


def test_calibration_examples_per_task(prepared: tuple[Suite, SuiteModels]) -> None:
    suite, _ = prepared
    n_calib = suite.settings["n_calib"]
    for examples in (5, n_calib + 7):
        batches = suite.calibration_batches("tiny_topic", batch_size=8, examples=examples)
        assert sum(b["input_ids"].shape[0] for b in batches) == examples
