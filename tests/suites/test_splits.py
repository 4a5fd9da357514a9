"""Splits: deduplication, disjointness, determinism, class balance."""

from collections import Counter

import pytest

from epmq.errors import EpmqError
from epmq.suites.task import build_task, dedupe, derived_seed, make_splits


def _pool(n: int = 400, classes: int = 4) -> tuple[list[str], list[int]]:
    texts = [f"example number {i}" for i in range(n)]
    labels = [i % classes for i in range(n)]
    # duplicates of existing texts with the same label
    texts += texts[:50]
    labels += labels[:50]
    return texts, labels


def test_dedupe_keeps_first_and_drops_conflicts() -> None:
    texts, labels = dedupe(["a", "b", "a", "c", "c"], [0, 1, 0, 0, 1])
    assert texts == ["a", "b"]
    assert labels == [0, 1]


def test_splits_are_disjoint_and_sized() -> None:
    texts, labels = _pool()
    train, calib, test = make_splits(
        "t", texts, labels, n_train=200, n_calib=40, n_test=100, seed=0
    )
    assert (len(train.texts), len(calib.texts), len(test.texts)) == (200, 40, 100)
    sets = [set(s.texts) for s in (train, calib, test)]
    assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]
    # no duplicates inside a split either
    assert sum(len(s) for s in sets) == 340
    # labels follow their texts
    lookup = dict(zip(texts, labels, strict=True))
    for split in (train, calib, test):
        assert all(lookup[t] == y for t, y in zip(split.texts, split.labels, strict=True))


def test_splits_are_deterministic_and_seeded() -> None:
    texts, labels = _pool()
    first = make_splits("t", texts, labels, n_train=100, n_calib=20, n_test=50, seed=3)
    again = make_splits("t", texts, labels, n_train=100, n_calib=20, n_test=50, seed=3)
    other = make_splits("t", texts, labels, n_train=100, n_calib=20, n_test=50, seed=4)
    renamed = make_splits("u", texts, labels, n_train=100, n_calib=20, n_test=50, seed=3)
    assert first == again
    assert first[2].texts != other[2].texts
    assert first[2].texts != renamed[2].texts


def test_balanced_draw_keeps_small_classes() -> None:
    texts = [f"big {i}" for i in range(900)] + [f"small {i}" for i in range(30)]
    labels = [0] * 900 + [1] * 30
    train, calib, test = make_splits(
        "t", texts, labels, n_train=100, n_calib=20, n_test=60, seed=0, balance=True
    )
    total = Counter(train.labels) + Counter(calib.labels) + Counter(test.labels)
    assert total[1] == 30  # every small-class example is used
    plain = make_splits(
        "t", texts, labels, n_train=100, n_calib=20, n_test=60, seed=0, balance=False
    )
    plain_total = Counter(plain[0].labels) + Counter(plain[1].labels) + Counter(plain[2].labels)
    assert plain_total[1] < 30


def test_small_pool_fills_test_first() -> None:
    texts = [f"x{i}" for i in range(30)]
    train, calib, test = make_splits(
        "t", texts, [0, 1] * 15, n_train=100, n_calib=10, n_test=15, seed=0
    )
    assert (len(test.texts), len(calib.texts), len(train.texts)) == (15, 10, 5)


def test_too_small_pool_and_bad_labels_raise() -> None:
    with pytest.raises(EpmqError, match="too few"):
        make_splits("t", ["a", "b"], [0, 1], n_train=10, n_calib=0, n_test=10, seed=0)
    with pytest.raises(EpmqError, match="labels"):
        build_task("t", ("a", "b"), ["x", "y"], [0, 2], sizes=(1, 0, 1), seed=0)


def test_derived_seed_is_stable() -> None:
    # fixed value: must not depend on PYTHONHASHSEED or the process
    assert derived_seed(0, "task") == derived_seed(0, "task")
    assert derived_seed(0, "task") != derived_seed(1, "task")
    assert derived_seed(0, "task") == 2206762292854691041


def test_calibration_texts_cut_or_top_up_from_train() -> None:
    texts, labels = _pool()
    task = build_task("t", ["a", "b", "c", "d"], texts, labels, sizes=(100, 20, 50), seed=0)
    assert task.calibration_texts() == task.calib.texts
    assert task.calibration_texts(8) == task.calib.texts[:8]
    more = task.calibration_texts(50)
    assert more[:20] == task.calib.texts and more[20:] == task.train.texts[:30]
    assert not set(more) & set(task.test.texts)  # never the test split
    with pytest.raises(EpmqError, match="120"):
        task.calibration_texts(121)
