"""Calibration text: read per-task files, sample them with a seed, tokenize into batches.

Files, one example each:

- ``.txt``: one example per non-empty line;
- ``.jsonl``: one JSON object per non-empty line, the text in field ``text`` (or ``field``);
- ``.csv``: a header row and a ``text`` column (or ``field``).

:func:`load_calibration` turns ``{task: file}`` into the ``{task: [batch, ...]}`` that
:func:`epmq.calib.quantize_model` takes: ``calib_size`` examples per task drawn with a seed
derived from ``seed`` and the task name, tokenized with the model's tokenizer, sorted by length
and padded per batch (padding is masked out of the statistics by ``attention_mask``).
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from epmq.errors import EpmqError
from epmq.models.folder import quiet_transformers

SUFFIXES = (".txt", ".jsonl", ".csv")
DEFAULT_FIELD = "text"


def read_texts(path: str | Path, field: str | None = None) -> list[str]:
    """The examples of a ``.txt``, ``.jsonl`` or ``.csv`` file (see the module docs).

    Empty examples are skipped; a file without any example is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise EpmqError(f"calibration file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise EpmqError(
            f"calibration file {path}: unknown type {suffix or '(none)'!r}; "
            f"use one of {', '.join(SUFFIXES)}"
        )
    name = field or DEFAULT_FIELD
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise EpmqError(f"calibration file {path} is not UTF-8 text ({exc.reason})") from None
    if suffix == ".txt":
        texts = [line.strip() for line in text.splitlines()]
    elif suffix == ".jsonl":
        texts = _jsonl(path, text, name)
    else:
        texts = _csv(path, text, name)
    texts = [t for t in texts if t]
    if not texts:
        raise EpmqError(f"calibration file {path} holds no examples")
    return texts


def _jsonl(path: Path, text: str, field: str) -> list[str]:
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise EpmqError(f"{path}:{number}: not valid JSON ({exc})") from None
        except RecursionError:
            raise EpmqError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
        if not isinstance(row, dict) or field not in row:
            raise EpmqError(f"{path}:{number}: no field {field!r}")
        if not isinstance(row[field], str):
            raise EpmqError(f"{path}:{number}: field {field!r} is not a string")
        texts.append(row[field].strip())
    return texts


def _csv(path: Path, text: str, field: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    if field not in columns:
        raise EpmqError(f"{path}: no column {field!r} (columns: {', '.join(columns) or 'none'})")
    try:
        return [(row.get(field) or "").strip() for row in reader]
    except csv.Error as exc:
        raise EpmqError(f"{path}:{reader.line_num}: {exc}") from None


def sample_texts(texts: Sequence[str], size: int, seed: int | str) -> list[str]:
    """``size`` examples drawn without replacement with ``seed`` (all of them when fewer),
    in file order."""
    if size < 1:
        raise EpmqError(f"calibration size must be >= 1, got {size}")
    if size >= len(texts):
        return list(texts)
    chosen = sorted(random.Random(str(seed)).sample(range(len(texts)), size))
    return [texts[i] for i in chosen]


def calibration_batches(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_length: int,
    input_names: Sequence[str] | None = None,
) -> list[dict[str, Tensor]]:
    """Tokenized, length-sorted batches of ``texts`` padded to their longest member.

    Each batch holds ``input_ids`` and ``attention_mask`` (and whatever else the tokenizer
    returns, e.g. ``token_type_ids``), restricted to ``input_names`` when given. A tokenizer
    without a pad token pads with its end-of-sequence (or unknown) token.
    """
    if batch_size < 1:
        raise EpmqError(f"batch size must be >= 1, got {batch_size}")
    if max_length < 1:
        raise EpmqError(f"max length must be >= 1, got {max_length}")
    if not texts:
        raise EpmqError("no calibration texts to tokenize")
    _ensure_pad_token(tokenizer)
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: (-len(ids[i]), i))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[start : start + batch_size]]
        encoded = tokenizer(
            chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        batch = {k: v for k, v in encoded.items() if input_names is None or k in input_names}
        if "input_ids" not in batch:
            raise EpmqError("the tokenizer produced no 'input_ids'")
        batches.append(batch)
    return batches


def _ensure_pad_token(tokenizer: Any) -> None:
    if getattr(tokenizer, "pad_token", None) is not None:
        return
    for fallback in ("eos_token", "unk_token"):
        token = getattr(tokenizer, fallback, None)
        if token is not None:
            tokenizer.pad_token = token
            return
    raise EpmqError("the tokenizer has no pad, end-of-sequence or unknown token to pad with")


def model_input_names(model: nn.Module) -> list[str] | None:
    """The named keyword inputs of ``model.forward`` (None when it takes any keyword)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return names or None


def load_tokenizer(folder: str | Path) -> Any:
    """``AutoTokenizer.from_pretrained(folder)`` (local files only) with a clear error."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise EpmqError(f"tokenizer folder {folder} does not exist")
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EpmqError(f"cannot load a tokenizer from {folder}: {first}") from None


def load_calibration(
    tokenizer: Any,
    files: Mapping[str, str | Path],
    *,
    size: int,
    max_length: int,
    batch_size: int,
    seed: int = 0,
    field: str | None = None,
    input_names: Sequence[str] | None = None,
) -> tuple[dict[str, list[dict[str, Tensor]]], dict[str, dict[str, Any]]]:
    """Per task: read, sample and tokenize its file.

    Returns ``(batches by task, info by task)``, where info records the file, the examples it
    holds and the examples used (for the run's record).
    """
    if not files:
        raise EpmqError("no calibration data given (--calib TASK=FILE)")
    calib: dict[str, list[dict[str, Tensor]]] = {}
    info: dict[str, dict[str, Any]] = {}
    for task, file in files.items():
        texts = read_texts(file, field)
        chosen = sample_texts(texts, size, f"{seed}:{task}")
        calib[task] = calibration_batches(
            tokenizer, chosen, batch_size=batch_size, max_length=max_length,
            input_names=input_names,
        )  # fmt: skip
        info[task] = {"file": str(file), "examples": len(texts), "used": len(chosen)}
    return calib, info


def parse_task_paths(values: Sequence[str], flag: str) -> dict[str, Path]:
    """``["task=path", ...]`` → ``{task: Path}``; malformed or repeated tasks are errors."""
    out: dict[str, Path] = {}
    for value in values:
        task, sep, path = value.partition("=")
        task, path = task.strip(), path.strip()
        if not sep or not task or not path:
            raise EpmqError(f"{flag} {value!r}: expected TASK=PATH")
        if task in out:
            raise EpmqError(f"{flag}: task {task!r} is given twice")
        out[task] = Path(path).expanduser()
    return out
