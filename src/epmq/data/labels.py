"""Class names and label mapping, the same for every format.

Stored labels are integers (class indices) or strings (class names). The class names are, in
order of precedence:

1. the ``classes`` the task gives;
2. the names the data carries (a ``ClassLabel`` feature, image sub-folders);
3. for string labels, the sorted distinct labels of the training split;
4. for integer labels, ``"0" .. str(max)`` over all splits.

Text formats store every label as a string, so when the data names no classes and every label
is a whole number (``"0"``, ``"12"``), the labels are read as class indices, unless the task's
``classes`` contain every one of them as a name. Integer labels must lie in ``0..len(classes)-1``
and string labels must be class names; anything else is an error naming the label, the split
file and the classes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from epmq.data.formats.raw import RawData, RawLabel, RawSplit, Request
from epmq.errors import EpmqError

WHOLE_NUMBER = re.compile(r"[+-]?\d+")


def check_classes(task: str, classes: Sequence[str]) -> tuple[str, ...]:
    """The given class names as a tuple: non-empty, strings, no duplicates."""
    names = tuple(classes)
    if not names:
        raise EpmqError(f"task {task}: the list of classes is empty")
    bad = [c for c in names if not isinstance(c, str) or not c]
    if bad:
        raise EpmqError(f"task {task}: class names must be non-empty strings, got {bad[0]!r}")
    duplicates = sorted({c for c in names if names.count(c) > 1})
    if duplicates:
        raise EpmqError(f"task {task}: classes listed twice: {duplicates}")
    return names


def resolve_labels(
    request: Request, raw: RawData
) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]]]:
    """``(classes, {split: class indices})`` for the splits of ``raw`` (see the module docs)."""
    given = check_classes(request.task, request.classes) if request.classes is not None else None
    splits = dict(raw.splits)
    if raw.classes is None and _whole_numbers(splits, given):
        splits = {
            name: RawSplit(s.inputs, [int(str(y).strip()) for y in s.labels], s.where, s.lines)
            for name, s in splits.items()
        }
    _check_one_kind(request, splits)
    if given is not None:
        classes = given
    elif raw.classes is not None:
        classes = check_classes(request.task, raw.classes)
    else:
        classes = _inferred_classes(request, splits)
    return classes, {name: _map(request, s, classes) for name, s in splits.items()}


def _whole_numbers(splits: dict[str, RawSplit], given: tuple[str, ...] | None) -> bool:
    """True when every label is a whole-number string that should be read as an index."""
    labels = [y for s in splits.values() for y in s.labels]
    if not labels or not all(
        isinstance(y, str) and WHOLE_NUMBER.fullmatch(y.strip()) for y in labels
    ):
        return False
    return given is None or not all(y in given for y in labels)


def _check_one_kind(request: Request, splits: dict[str, RawSplit]) -> None:
    first: dict[type, tuple[RawSplit, int]] = {}
    for split in splits.values():
        for i, label in enumerate(split.labels):
            first.setdefault(type(label), (split, i))
    if len(first) > 1:
        (split_a, i), (split_b, j) = first[int], first[str]
        raise request.fail(
            f"labels mix class indices and class names ({split_a.labels[i]!r} at "
            f"{split_a.locate(i)}, {split_b.labels[j]!r} at {split_b.locate(j)})"
        )


def _inferred_classes(request: Request, splits: dict[str, RawSplit]) -> tuple[str, ...]:
    labels = [y for s in splits.values() for y in s.labels]
    if not labels:
        return ()
    if isinstance(labels[0], str):
        return tuple(sorted({str(y) for y in splits["train"].labels}))
    low = min(int(y) for y in labels)
    if low < 0:
        split = next(s for s in splits.values() if low in s.labels)
        raise request.fail(
            f"label {low} is negative; class indices start at 0",
            split.locate(list(split.labels).index(low)),
        )
    return tuple(str(i) for i in range(max(int(y) for y in labels) + 1))


def _map(request: Request, split: RawSplit, classes: tuple[str, ...]) -> tuple[int, ...]:
    index = {name: i for i, name in enumerate(classes)}
    out = []
    for i, label in enumerate(split.labels):
        value = _index_of(label, index, len(classes))
        if value is None:
            raise request.fail(
                f"label {label!r} is not one of the {len(classes)} classes {list(classes)}",
                split.locate(i),
            )
        out.append(value)
    return tuple(out)


def _index_of(label: RawLabel, index: dict[str, int], count: int) -> int | None:
    if isinstance(label, str):
        return index.get(label)
    return label if 0 <= label < count else None
