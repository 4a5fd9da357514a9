"""epmq.data: users' labelled task data read from disk.

:func:`read_task_data` reads one task in one of the formats of :data:`FORMATS`:

- ``csv`` / ``jsonl``: a folder with ``train`` and ``test`` files (and optionally ``calib``),
  text in ``text_column``, label in ``label_column``;
- ``npz``: one ``.npz`` file with ``x_train, y_train, x_test, y_test`` (optionally
  ``x_calib, y_calib``), texts as string arrays or images as numeric arrays;
- ``imagefolder``: ``train/<class>/*.png`` and ``test/<class>/...`` (optionally ``calib/``);
- ``hf_disk``: a ``datasets.DatasetDict`` saved with ``save_to_disk`` (needs ``datasets``).

It returns a :class:`TaskData`: class names, train / test (/ calibration) :class:`Examples`
whose labels index the classes, and seeded calibration sampling. Images stay lazy
(:class:`ImageRef`) until :func:`load_images` or :meth:`ImagePreprocessing.pixel_values`
decodes them; :class:`ImagePreprocessing` reproduces ``CLIPImageProcessor`` without torchvision.
"""

from epmq.data.examples import Examples, Modality, TaskData, shared_examples
from epmq.data.formats import FORMATS
from epmq.data.image_refs import ArrayImage, DatasetImage, FileImage, ImageRef, load_images
from epmq.data.images import CLIP_MEAN, CLIP_STD, ImagePreprocessing
from epmq.data.reader import read_task_data

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FORMATS",
    "ArrayImage",
    "DatasetImage",
    "Examples",
    "FileImage",
    "ImagePreprocessing",
    "ImageRef",
    "Modality",
    "TaskData",
    "load_images",
    "read_task_data",
    "shared_examples",
]
