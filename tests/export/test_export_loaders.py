"""epmq's own loaders read compressed-tensors exports: one helper (``models.folder.from_folder``)
behind ``suites.classifier.load_encoder`` and every family's ``load_*``.

Asymmetric 4-bit pack-quantized exports (packed ``weight_zero_point``, which transformers 5.23
loads only with ``CompressedTensorsConfig(dequantize=True)``) are written with float32 scales
and tensors, so the loaded weights equal the dequantized weights bit for bit; outputs are
compared with the in-memory dequantized model at 1e-5 absolute (measured: exact).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from export_tiny_models import (
    dequantized_reference,
    outputs,
    quantize_model,
    tiny_bert_encoder,
    tiny_clip_vision,
    tiny_llama,
    tiny_t5,
)

from epmq.errors import EpmqError
from epmq.export import export_checkpoint
from epmq.models.bert import load_bert
from epmq.models.clip import load_clip
from epmq.models.folder import quantization_kwargs
from epmq.models.llama import load_llama
from epmq.models.registry import load_model
from epmq.models.t5 import load_t5
from epmq.quant import QuantGrid
from epmq.suites.classifier import load_encoder

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.filterwarnings("error:You passed `quantization_config`:UserWarning")

TOLERANCE = 1e-5


def _encoder_loader(path: Path) -> torch.nn.Module:
    return load_bert(path, add_pooling_layer=False)


# name -> (build, layers left in float, loaders to check)
CASES: dict[str, tuple[Callable, tuple[str, ...], tuple[Callable, ...]]] = {
    "bert": (tiny_bert_encoder, (), (load_encoder, _encoder_loader)),
    "llama": (tiny_llama, ("lm_head",), (load_llama, lambda p: load_model(p)[0])),
    "t5": (tiny_t5, ("lm_head",), (load_t5,)),
    "clip": (tiny_clip_vision, (), (load_clip,)),
}


def _export(tmp_path: Path, arch: str, fmt: str = "compressed-tensors", symmetric: bool = False):
    build, skip, loaders = CASES[arch]
    model = build()
    original = outputs(model)
    results = quantize_model(model, skip, QuantGrid(4, 32, symmetric=symmetric))
    out = tmp_path / f"{arch}-{fmt}"
    export_checkpoint(model, results, out, format=fmt, dtype=torch.float32)
    reference = dequantized_reference(model, results)
    # the quantization moves the outputs far beyond the tolerance: the check is meaningful
    assert float((original - reference).abs().max()) > 100 * TOLERANCE
    return out, results, reference, loaders


@pytest.mark.parametrize("arch", sorted(CASES))
def test_loaders_read_asymmetric_compressed_tensors(tmp_path: Path, arch: str) -> None:
    out, results, reference, loaders = _export(tmp_path, arch)
    assert "quantization_config" in quantization_kwargs(out)
    for load in loaders:
        model = load(out)
        assert not model.training
        torch.testing.assert_close(outputs(model), reference, rtol=0, atol=TOLERANCE)
        for name, r in results.items():
            assert torch.equal(model.get_submodule(name).weight.data, r.weight.float()), name


def test_symmetric_export_loads_the_same_way(tmp_path: Path) -> None:
    out, _, reference, _ = _export(tmp_path, "llama", symmetric=True)
    torch.testing.assert_close(outputs(load_llama(out)), reference, rtol=0, atol=TOLERANCE)


def test_plain_folder_needs_no_extra_arguments(tmp_path: Path) -> None:
    out, _, reference, _ = _export(tmp_path, "bert", fmt="dequantized")
    assert quantization_kwargs(out) == {}
    torch.testing.assert_close(outputs(load_encoder(out)), reference, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_gptq_folder_is_refused_naming_the_runtime(tmp_path: Path, arch: str) -> None:
    out, _, _, loaders = _export(tmp_path, arch, fmt="gptq", symmetric=True)
    for load in loaders:
        with pytest.raises(EpmqError, match=r"'gptq' checkpoint loads only in a GPTQ runtime"):
            load(out)
