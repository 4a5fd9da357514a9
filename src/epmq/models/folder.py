"""Reading a local Hugging Face model folder: its ``config.json``, and how to load it.

:func:`from_folder` is the one ``from_pretrained`` call of every loader (the model families'
``load_*`` and the suites' encoder): local files only, plus what the folder's
``quantization_config`` needs (:func:`quantization_kwargs`).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

from epmq.errors import EpmqError

# transformers warns that the folder's own quantization_config wins over the one passed; only
# its loading attributes (dequantize) are taken from ours, which is what we want.
_PASSED_CONFIG_WARNING = "You passed `quantization_config`"


#: ``quantization_config.quant_method`` of a GPTQ checkpoint (a file format, not a solver)
GPTQ_QUANT_METHOD = "gptq"


def read_config(folder: str | Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict (:class:`EpmqError` naming what is wrong)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise EpmqError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise EpmqError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise EpmqError(f"{config_file} does not hold a JSON object")
    return config


def quantization_method(folder: str | Path) -> str | None:
    """``quantization_config.quant_method`` of the folder's config.json (None: plain float)."""
    qconfig = read_config(folder).get("quantization_config")
    if not qconfig:
        return None
    return str(qconfig.get("quant_method", "unknown")) if isinstance(qconfig, dict) else "unknown"


def quantization_kwargs(folder: str | Path) -> dict[str, Any]:
    """Extra ``from_pretrained`` keyword arguments that the folder's quantization needs.

    - plain float folder: none;
    - ``compressed-tensors``: ``quantization_config=CompressedTensorsConfig(dequantize=True)``,
      so the packed weights become plain float ``Linear`` weights on load. transformers 5.23
      loads *asymmetric* pack-quantized checkpoints (``weight_zero_point``) only this way (its
      default compressed mode hits a size mismatch); symmetric ones load either way;
    - ``gptq`` (and any other method): :class:`EpmqError`, they need their own runtime.
    """
    method = quantization_method(folder)
    if method is None:
        return {}
    if method == "compressed-tensors":
        if importlib.util.find_spec("compressed_tensors") is None:
            raise EpmqError(
                f"{folder}: a compressed-tensors checkpoint needs the compressed-tensors package "
                "(pip install 'epmq[export]')"
            )
        from transformers import CompressedTensorsConfig

        return {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    if method == GPTQ_QUANT_METHOD:
        raise EpmqError(
            f"{folder}: a 'gptq' checkpoint loads only in a GPTQ runtime (gptqmodel with optimum, "
            "or vLLM on a GPU); export it as 'compressed-tensors' or 'dequantized' to load it here"
        )
    raise EpmqError(
        f"{folder}: quantization method {method!r} cannot be loaded; epmq loads plain float and "
        "compressed-tensors folders"
    )


def from_folder(model_class: Any, folder: str | Path, **kwargs: Any) -> Any:
    """``model_class.from_pretrained(folder)`` from local files only, with the folder's
    :func:`quantization_kwargs` (``kwargs`` override them)."""
    from epmq.merging.checkpoint import check_weight_files

    kwargs = {**quantization_kwargs(folder), **kwargs}
    check_weight_files(Path(folder))  # a corrupt file is one line naming it, not a traceback
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PASSED_CONFIG_WARNING, category=UserWarning)
        return model_class.from_pretrained(str(folder), local_files_only=True, **kwargs)


def check_vocabulary(
    model: Any, tokenizer: Any, model_dir: str | Path, tokenizer_dir: str | Path
) -> None:
    """Refuse a tokenizer with more tokens than the model embeds (another model's vocabulary:
    its ids would index past the embedding table); models without a token embedding pass."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) and tokenizer is not None else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise EpmqError(
            f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model in "
            f"{model_dir} embeds only {rows}: they come from different vocabularies"
        )
