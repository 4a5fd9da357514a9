"""The ``hf_disk`` format: a ``datasets.DatasetDict`` saved with ``save_to_disk``.

The dict needs ``train`` and ``test`` splits; the first of ``calibration``, ``calib`` and
``validation`` present is the calibration split (other splits are ignored). Inputs are images
when ``image_column`` is an ``Image`` feature (rows are decoded on demand through
:class:`~epmq.data.image_refs.DatasetImage`), else texts from ``text_column``. A ``ClassLabel``
label feature names the classes. ``datasets`` is imported only when this format is used.
"""

from __future__ import annotations

from typing import Any

from epmq.data.examples import Modality
from epmq.data.formats.raw import RawData, RawLabel, RawSplit, Request, cell_label
from epmq.data.image_refs import DatasetImage
from epmq.errors import EpmqError

CALIBRATION_SPLITS = ("calibration", "calib", "validation")


def read_hf_disk(request: Request) -> RawData:
    """Open a saved ``DatasetDict`` and read its splits (images stay on disk)."""
    datasets = _import_datasets(request)
    if not request.path.exists():
        raise request.fail("does not exist")
    try:
        loaded = datasets.load_from_disk(str(request.path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise request.fail(f"holds no saved dataset ({first})") from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise request.fail(
            "holds a single Dataset; save a DatasetDict with 'train' and 'test' splits"
        )
    names = list(loaded)
    for split in ("train", "test"):
        if split not in loaded:
            raise request.fail(f"has no {split!r} split (splits: {', '.join(names)})")
    chosen = {"train": "train", "test": "test"}
    calib = next((s for s in CALIBRATION_SPLITS if s in loaded), None)
    if calib is not None:
        chosen["calib"] = calib
    train = loaded["train"]
    modality, column = _input_column(request, train, datasets)
    classes = _class_names(train.features.get(request.label_column), datasets)
    splits = {}
    for split, stored in chosen.items():
        dataset = loaded[stored]
        where = f"{request.path} [{stored}]"
        for needed in (column, request.label_column):
            if needed not in dataset.column_names:
                columns = ", ".join(repr(c) for c in dataset.column_names)
                raise request.fail(f"split {stored!r} has no column {needed!r} ({columns})")
        split_classes = _class_names(dataset.features[request.label_column], datasets)
        if split_classes != classes:
            raise request.fail(
                f"split {stored!r} names the classes {split_classes}, but 'train' {classes}"
            )
        splits[split] = _read_split(request, dataset, modality, column, where)
    return RawData(modality, splits, tuple(classes) if classes is not None else None)


def _import_datasets(request: Request) -> Any:
    try:
        import datasets
    except ImportError:
        raise EpmqError(
            f"task {request.task}: the hf_disk format needs the datasets package: "
            "pip install datasets"
        ) from None
    return datasets


def _input_column(request: Request, dataset: Any, datasets: Any) -> tuple[Modality, str]:
    """Images when ``image_column`` is an ``Image`` feature, else texts in ``text_column``."""
    features = dataset.features
    columns = ", ".join(repr(c) for c in dataset.column_names)
    if request.label_column not in features:
        raise request.fail(f"split 'train' has no column {request.label_column!r} ({columns})")
    image = features.get(request.image_column)
    if isinstance(image, datasets.Image):
        return "image", request.image_column
    text = features.get(request.text_column)
    if text is not None:
        if not (isinstance(text, datasets.Value) and text.dtype in ("string", "large_string")):
            raise request.fail(f"column {request.text_column!r} is {text}, not a string column")
        return "text", request.text_column
    if image is not None:
        raise request.fail(f"column {request.image_column!r} is {image}, not an Image feature")
    raise request.fail(
        f"split 'train' has neither a {request.text_column!r} nor an {request.image_column!r} "
        f"column ({columns})"
    )


def _class_names(feature: Any, datasets: Any) -> list[str] | None:
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _read_split(
    request: Request, dataset: Any, modality: Modality, column: str, where: str
) -> RawSplit:
    raw = list(dataset[request.label_column])
    labels: list[RawLabel] = [
        cell_label(request, value, f"{where}, example {i + 1}") for i, value in enumerate(raw)
    ]
    if modality == "image":
        images = dataset.select_columns([column])  # a row then decodes only the image
        refs = [DatasetImage(images, i, column, where, request.task) for i in range(len(images))]
        return RawSplit(refs, labels, where)
    texts = list(dataset[column])
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise request.fail(f"example {bad + 1} has no text in {column!r}", where)
    return RawSplit(texts, labels, where)
