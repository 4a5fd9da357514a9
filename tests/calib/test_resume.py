"""Interrupted runs resume from the block checkpoint and give the uninterrupted result."""

from __future__ import annotations

import pytest
import torch
from calib_fixtures import Setup

from epmq.calib import EngineOptions, quantize_model
from epmq.errors import EpmqError
from epmq.models.bert import BertAdapter
from epmq.quant import QuantGrid
from solver_params import params_for


class Interrupt(Exception):
    pass


def stop_after(block: int):
    def callback(stage: str, index: int) -> None:
        if index == block:
            raise Interrupt

    return callback


@pytest.mark.parametrize(
    ("method", "x_source"),
    [("gptq", "quantized"), ("epmq", "expert"), ("epmq", "merged"), ("awq", "quantized")],
)
def test_resume_equals_uninterrupted(setup: Setup, tmp_path, method: str, x_source: str) -> None:
    kwargs = dict(
        method=method,
        grid=QuantGrid(3, group_size=16),
        experts=setup.experts,
        x_source=x_source,
        **params_for(method, alpha=0.05),
    )
    full = setup.merged()
    reference = quantize_model(full, BertAdapter(), setup.calib, **kwargs)

    ckpt = tmp_path / "ckpt"
    interrupted = setup.merged()
    with pytest.raises(Interrupt):
        quantize_model(
            interrupted,
            BertAdapter(),
            setup.calib,
            **kwargs,
            engine=EngineOptions(checkpoint_dir=ckpt, on_block_end=stop_after(0)),
        )
    assert (ckpt / "encoder-block-0000.safetensors").is_file()
    assert not (ckpt / "encoder-block-0001.safetensors").exists()

    resumed_model = setup.merged()  # a fresh process would reload the merged model
    resumed = quantize_model(
        resumed_model,
        BertAdapter(),
        setup.calib,
        **kwargs,
        engine=EngineOptions(checkpoint_dir=ckpt),
    )
    assert resumed.resumed_blocks == 1
    for (name, a), b in zip(full.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert [r.name for r in resumed.layers] == [r.name for r in reference.layers]
    assert [r.proxy_loss for r in resumed.layers] == pytest.approx(
        [r.proxy_loss for r in reference.layers], nan_ok=True
    )
    for name, result in reference.results.items():
        other = resumed.results[name]
        assert torch.equal(result.codes, other.codes)
        assert torch.equal(result.scales, other.scales)
        assert torch.equal(result.g_idx, other.g_idx)


def test_checkpoint_with_other_settings_is_refused(setup: Setup, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    quantize_model(
        setup.merged(),
        BertAdapter(),
        setup.calib,
        method="rtn",
        grid=QuantGrid(4),
        engine=EngineOptions(checkpoint_dir=ckpt, progress=False),
    )
    with pytest.raises(EpmqError, match="grid"):
        quantize_model(
            setup.merged(),
            BertAdapter(),
            setup.calib,
            method="rtn",
            grid=QuantGrid(3),
            engine=EngineOptions(checkpoint_dir=ckpt, progress=False),
        )
