"""Model-level export: a Hugging Face folder with quantized linear layers in a chosen format.

The folder holds ``config.json`` (with ``quantization_config`` for quantized formats),
``model.safetensors``, any tokenizer/processor files copied from ``base_dir``, format side
files (``quantize_config.json`` for GPTQ) and ``epmq_record.json`` (what was merged and how it
was quantized). Parameters of modules not in ``results`` keep their values (cast to ``dtype``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from epmq.atomic import output_dir, save_tensors, write_bytes, write_json
from epmq.errors import EpmqError
from epmq.export.formats import ExportFormat, get_format
from epmq.export.quantized import QuantizedWeight, ResultLike, check_weight
from epmq.export.sizes import (
    ExportSummary,
    float16_checkpoint_bytes,
    folder_files,
    unique_state_dict,
)

WEIGHTS_NAME = "model.safetensors"
RECORD_NAME = "epmq_record.json"
# Files a tokenizer, processor or generation setup needs, copied from base_dir when present.
BASE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "generation_config.json",
)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_results(
    model: torch.nn.Module, results: Mapping[str, ResultLike]
) -> dict[str, QuantizedWeight]:
    """Check every result against its module: it must name an ``nn.Linear`` of that shape."""
    if not results:
        raise EpmqError("export: 'results' is empty; nothing was quantized")
    modules = dict(model.named_modules())
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(param.data_ptr(), []).append(pname)
    checked: dict[str, QuantizedWeight] = {}
    for name, result in results.items():
        module = modules.get(name)
        if module is None:
            raise EpmqError(f"export: module {name!r} named in results is not in the model")
        if not isinstance(module, torch.nn.Linear):
            raise EpmqError(
                f"export: module {name!r} is a {type(module).__name__}; only nn.Linear "
                "weights can be exported quantized"
            )
        tied = [n for n in owners.get(module.weight.data_ptr(), []) if n != f"{name}.weight"]
        if tied:
            raise EpmqError(
                f"export: {name}.weight is tied to {', '.join(tied)}; a tied weight cannot be "
                "stored quantized (leave the module out of results, or untie it first)"
            )
        checked[name] = check_weight(name, result, tuple(module.weight.shape))
    return checked


def build_state_dict(
    model: torch.nn.Module,
    weights: Mapping[str, QuantizedWeight],
    fmt: ExportFormat,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors: every model tensor, quantized weights replaced by the format's."""
    tensors: dict[str, torch.Tensor] = {}
    for key, t in unique_state_dict(model).items():
        module_name, _, local = key.rpartition(".")
        if module_name in weights and local == "weight":
            continue
        tensors[key] = t.detach().cpu().to(dtype) if t.is_floating_point() else t.detach().cpu()
    for name, q in weights.items():
        for local, t in fmt.pack_module(q, dtype).items():
            tensors[f"{name}.{local}"] = t
    return tensors


def model_config(
    model: torch.nn.Module, dtype: torch.dtype, qconfig: dict[str, Any] | None
) -> dict[str, Any]:
    """config.json contents: the model's config, architectures, dtype, quantization_config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise EpmqError(
            f"export: model {type(model).__name__} has no Hugging Face config; "
            "export needs a transformers PreTrainedModel"
        )
    data = config.to_dict()
    data["architectures"] = [type(model).__name__]
    data["dtype"] = str(dtype).removeprefix("torch.")
    data.pop("quantization_config", None)
    if qconfig is not None:
        data["quantization_config"] = qconfig
    return data


def _record(
    fmt: ExportFormat, weights: Mapping[str, QuantizedWeight], record: Mapping | None
) -> dict[str, Any]:
    data = {
        "export": {
            "format": fmt.name,
            "modules": {
                name: {
                    "bits": q.bits,
                    "group_size": q.group_size,
                    "symmetric": q.symmetric,
                    "act_order": q.act_order,
                }
                for name, q in sorted(weights.items())
            },
        },
        "record": dict(record) if record is not None else None,
    }
    try:
        json.dumps(data)
    except TypeError as err:
        raise EpmqError(f"export: 'record' is not JSON-serialisable: {err}") from None
    return data


def export_checkpoint(
    model: torch.nn.Module,
    results: Mapping[str, ResultLike],
    out_dir: str | Path,
    *,
    format: str,
    base_dir: str | Path | None = None,
    record: Mapping | None = None,
    force: bool = False,
    dtype: torch.dtype = torch.float16,
) -> ExportSummary:
    """Write ``model`` with the quantized linear layers in ``results`` as a checkpoint folder.

    ``results`` maps module names (``encoder.layer.0.attention.self.query``) to quantization
    results (``epmq.quant.QuantResult`` or anything with the same fields). ``format`` is a
    registered export format (``compressed-tensors``, ``gptq``, ``dequantized``); ``dtype`` is
    the float type of every non-quantized tensor and of the scales (GPTQ scales are always
    float16). Tokenizer/processor files are copied from ``base_dir`` when given. The folder
    appears atomically; an existing one is replaced only with ``force``. Returns the sizes and
    prints a one-line report.
    """
    fmt = get_format(format)
    if dtype not in _FLOAT_DTYPES:
        raise EpmqError(f"export: dtype {dtype} is not one of {_FLOAT_DTYPES}")
    base = Path(base_dir) if base_dir is not None else None
    if base is not None and not base.is_dir():
        raise EpmqError(f"export: base_dir {base} is not a folder")
    weights = check_results(model, results)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    qconfig = fmt.quantization_config(weights, linear_names)
    config = model_config(model, dtype, qconfig)
    record_data = _record(fmt, weights, record)
    tensors = build_state_dict(model, weights, fmt, dtype)
    with output_dir(out_dir, force=force) as tmp:
        save_tensors(tmp / WEIGHTS_NAME, tensors, {"format": "pt"})
        write_json(tmp / "config.json", config)
        for name in fmt.config_files:
            write_json(tmp / name, qconfig)
        write_json(tmp / RECORD_NAME, record_data)
        if base is not None:
            for name in BASE_FILES:
                if (base / name).is_file():
                    write_bytes(tmp / name, (base / name).read_bytes())
    out = Path(out_dir)
    summary = ExportSummary(
        out_dir=out,
        format=fmt.name,
        n_quantized=len(weights),
        bits=tuple(sorted({q.bits for q in weights.values()})),
        files=folder_files(out),
        float16_bytes=float16_checkpoint_bytes(model),
    )
    print(summary.report())
    return summary
