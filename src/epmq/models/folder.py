"""Reading a local Hugging Face model folder: its ``config.json``, and how to load it.

:func:`from_folder` is the one ``from_pretrained`` call of every loader (the model families'
``load_*``, the CLIP vision tower of the heads and the suites' encoder): local files only, plus
what the folder's ``quantization_config`` needs (:func:`quantization_kwargs`), with
transformers' progress bars and load reports silenced (:func:`quiet_transformers`) and its
loading report checked (:func:`check_loading_info`): no weight is ever left random.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from epmq.errors import EpmqError

log = logging.getLogger(__name__)

#: how many tensor names a loading message lists before "and N more"
_NAMES_SHOWN = 5

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


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports, logger warnings and progress bars ("Loading
    weights", "Writing model shards"): epmq checks the loading report itself, and a failing
    command prints one line."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def from_folder(
    model_class: Any,
    folder: str | Path,
    *,
    optional: Sequence[str] = (),
    unused: Sequence[str] = (),
    **kwargs: Any,
) -> Any:
    """``model_class.from_pretrained(folder)`` from local files only, with the folder's
    :func:`quantization_kwargs` (``kwargs`` override them), quietly, and its loading report
    checked by :func:`check_loading_info` (``optional``, ``unused``: see there)."""
    from epmq.merging.checkpoint import check_weight_files

    kwargs = {"ignore_mismatched_sizes": True, **quantization_kwargs(folder), **kwargs}
    check_weight_files(Path(folder))  # a corrupt file is one line naming it, not a traceback
    with warnings.catch_warnings(), quiet_transformers():
        warnings.filterwarnings("ignore", message=_PASSED_CONFIG_WARNING, category=UserWarning)
        model, info = model_class.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, **kwargs
        )
    check_loading_info(model, folder, info, optional=optional, unused=unused)
    return model


def check_loading_info(
    model: nn.Module,
    folder: str | Path,
    info: Mapping[str, Any],
    *,
    optional: Sequence[str] = (),
    unused: Sequence[str] = (),
) -> None:
    """Refuse a load that left weights random; warn about checkpoint tensors left out.

    ``info`` is transformers' loading report (``output_loading_info=True``):

    - ``missing_keys``: parameters of the model that the checkpoint lacks, which transformers
      fills with random values. Refused, :class:`EpmqError` naming the folder and the first
      tensors. Not reported, so tolerated: tied weights that transformers fills from the
      tensor they share (T5's ``lm_head``, a Llama with ``tie_word_embeddings``) and
      non-persistent buffers (``position_ids``, ``token_type_ids``), which no checkpoint
      holds. Each of ``optional`` names a submodule (``pooler``) that is removed from the
      model, set to ``None``, when the checkpoint holds *none* of its tensors: the model gets
      no module the source did not have (the class must run without it, as BERT's pooler).
    - ``mismatched_keys`` (loaded with ``ignore_mismatched_sizes``, else transformers raises
      a bare RuntimeError): tensors whose shape differs from the config's; refused the same.
    - ``unexpected_keys``: checkpoint tensors the class does not use (a task head when the
      base encoder is loaded, a pooler loaded without one). They do not change what the
      model computes, so they are one warning line naming them, except those under
      ``unused``: the submodules the caller leaves out on purpose (CLIP's text tower when
      only the vision tower is loaded). A checkpoint of another family is not only
      unexpected keys: its model's tensors are all missing, and that is refused.
    """
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    missing = set(info.get("missing_keys") or ())
    for name in optional:
        missing -= _drop_if_absent(model, name, missing)
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shown = [f"{key} {tuple(ckpt)} (config: {tuple(want)})" for key, ckpt, want in mismatched]
        raise EpmqError(
            f"{folder}: {len(shown)} tensor(s) of the checkpoint do not have the shape the "
            f"config.json gives: {_names(shown)}"
        )
    if missing:
        raise EpmqError(
            f"{folder}: the checkpoint lacks {len(missing)} tensor(s) that "
            f"{type(model).__name__} needs (they would be random): {_names(sorted(missing))}"
        )
    extra = sorted(k for k in info.get("unexpected_keys") or () if not _under(k, unused, prefix))
    if extra:
        log.warning(
            "%s: %d tensor(s) of the checkpoint are not part of %s and are left out: %s",
            folder,
            len(extra),
            type(model).__name__,
            _names(extra),
        )


def _names(names: Sequence[str]) -> str:
    """The first few ``names``, then "and N more"."""
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def _under(key: str, modules: Collection[str], prefix: str) -> bool:
    """Whether ``key`` is a tensor of one of ``modules`` (with or without the base model's
    ``prefix``, as a task model's checkpoint names them)."""
    for module in modules:
        for path in (module, f"{prefix}.{module}" if prefix else module):
            if key == path or key.startswith(f"{path}."):
                return True
    return False


def _drop_if_absent(model: nn.Module, name: str, missing: set[str]) -> set[str]:
    """Remove submodule ``name`` when all its tensors are ``missing``; the names it removed."""
    module = getattr(model, name, None)
    if not isinstance(module, nn.Module):
        return set()
    own = {f"{name}.{key}" for key in module.state_dict()}
    if not own <= missing:
        return set()
    setattr(model, name, None)
    return own


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
