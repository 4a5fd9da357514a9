"""Every model family through the engine: rounded weights lie on the grid, and an interrupted
run resumed from its block checkpoint equals the uninterrupted run bit for bit.

The tiny models, calibration batches and expert perturbations come from the family tests
(``test_bert``, ``test_clip``, ``test_t5``, ``test_llama``, ``tiny_experts``); the experts are
saved as safetensors folders, as a real run reads them. BERT's resume is covered by
``tests/calib/test_resume.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import test_bert as bert_family
import test_clip as clip_family
import test_llama as llama_family
import test_t5 as t5_family
import torch
from tiny_experts import make_experts, with_state
from torch import nn
from transformers import CLIPVisionModel

from epmq.calib import CalibrationRun, EngineOptions, quantize_model
from epmq.models.adapter import BlockAdapter
from epmq.models.bert import BertAdapter
from epmq.models.clip import ClipVisionAdapter
from epmq.models.llama import LlamaAdapter
from epmq.models.t5 import T5Adapter
from epmq.quant import QuantGrid
from solver_params import params_for

Batch = dict[str, torch.Tensor]


@dataclass
class FamilySetup:
    """A tiny base model of one family, two experts (safetensors folders), their average."""

    name: str
    base: nn.Module
    adapter: Callable[[], BlockAdapter]
    experts: list[Path]
    merged_state: dict[str, torch.Tensor]
    calib: dict[str, list[Batch]]

    def merged(self) -> nn.Module:
        """A fresh copy of the merged model (what a restarted process would load)."""
        return with_state(self.base, self.merged_state)

    def quantize(
        self,
        method: str,
        x_source: str | None = None,
        *,
        grid: QuantGrid = QuantGrid(4, group_size=16),
        engine: EngineOptions | None = None,
        task_weights: list[float] | None = None,
        **params: Any,
    ) -> tuple[nn.Module, CalibrationRun]:
        """A fresh merge quantized by ``method`` on ``grid`` (α = 0.05 and ``params`` where
        the solver declares them; ``x_source`` None: the solver's default), with ``engine``
        (default: no progress bar)."""
        model = self.merged()
        run = quantize_model(
            model,
            self.adapter(),
            self.calib,
            method=method,
            grid=grid,
            experts=self.experts,
            x_source=x_source,
            **params_for(method, alpha=0.05, **params),
            task_weights=task_weights,
            engine=engine or EngineOptions(progress=False),
        )
        return model, run

    def block_order(self) -> list[tuple[str, int]]:
        """``(stage name, block index)`` of every block, in the engine's order."""
        adapter = self.adapter()
        return [
            (stage.name, index)
            for stage in adapter.stages(self.base)
            for index in range(len(adapter.blocks(self.base, stage)))
        ]


def _bert() -> tuple[nn.Module, Callable[[], BlockAdapter], str, dict[str, list[Batch]]]:
    calib = {
        "a": [bert_family.batch(s) for s in (10, 11)],
        "b": [bert_family.batch(s) for s in (12, 13)],
    }
    return bert_family.tiny_bert(seed=6), BertAdapter, ".layer.", calib


def _clip() -> tuple[nn.Module, Callable[[], BlockAdapter], str, dict[str, list[Batch]]]:
    pixels = clip_family.pixels
    calib = {
        "left": [{"pixel_values": pixels(4, shift=-1.0, seed=s)} for s in (10, 11)],
        "right": [{"pixel_values": pixels(4, shift=1.0, seed=s)} for s in (12, 13)],
    }
    return clip_family.make(CLIPVisionModel, seed=6), ClipVisionAdapter, ".layers.", calib


def _token_tasks(batch: Callable[..., Batch], low: int) -> dict[str, list[Batch]]:
    """Two calibration tasks drawing token ids from disjoint ranges (below / above 50)."""
    return {
        "low": [batch(seed=s, low=low, high=50) for s in (10, 11)],
        "high": [batch(seed=s, low=50, high=100) for s in (12, 13)],
    }


def _t5() -> tuple[nn.Module, Callable[[], BlockAdapter], str, dict[str, list[Batch]]]:
    calib = _token_tasks(t5_family.batch, low=2)
    return t5_family.make(seed=8), T5Adapter, ".block.", calib


def _llama() -> tuple[nn.Module, Callable[[], BlockAdapter], str, dict[str, list[Batch]]]:
    calib = _token_tasks(llama_family.batch, low=0)
    return llama_family.make(seed=8), LlamaAdapter, ".layers.", calib


BUILDERS = {"bert": _bert, "clip": _clip, "t5": _t5, "llama": _llama}


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], FamilySetup]:
    """Family name → its setup, built once per module (experts written to disk once)."""
    cache: dict[str, FamilySetup] = {}

    def get(name: str) -> FamilySetup:
        if name not in cache:
            base, adapter, marker, calib = BUILDERS[name]()
            states = make_experts(base, marker)
            folders = []
            root = tmp_path_factory.mktemp(f"{name}-experts")
            for i, state in enumerate(states):
                with_state(base, state).save_pretrained(root / f"expert{i}")
                folders.append(root / f"expert{i}")
            merged = {k: (states[0][k] + states[1][k]) / 2 for k in states[0]}
            cache[name] = FamilySetup(name, base, adapter, folders, merged, calib)
        return cache[name]

    return get


def block_linears(model: nn.Module, adapter: BlockAdapter) -> list[str]:
    """Full module names of every linear the adapter solves, block by block."""
    names = []
    for stage in adapter.stages(model):
        for index, block in enumerate(adapter.blocks(model, stage)):
            for group in adapter.linear_groups(block):
                names.extend(f"{stage.blocks_path}.{index}.{name}" for name in group)
    return names


def assert_on_grid(
    model: nn.Module, adapter: BlockAdapter, run: CalibrationRun, grid: QuantGrid, act_order: bool
) -> None:
    """Every block linear was rounded, and its weight in ``model`` is exactly on ``grid``."""
    expected = block_linears(model, adapter)
    assert sorted(run.results) == sorted(expected)
    for name, result in run.results.items():
        weight = model.get_submodule(name).weight.detach()
        rows, cols = weight.shape
        assert result.grid == grid, name
        assert torch.equal(weight, result.weight), name
        assert torch.equal(weight, result.dequantize()), name

        codes = result.codes
        assert codes.dtype == grid.codes_dtype() and codes.shape == weight.shape, name
        assert int(codes.min()) >= 0 and int(codes.max()) <= grid.maxq, name

        n_groups = grid.n_groups(cols)
        assert result.scales.shape == result.zeros.shape == (rows, n_groups), name
        assert bool((result.scales > 0).all()), name
        assert torch.equal(result.zeros, result.zeros.round()), name
        assert float(result.zeros.min()) >= 0 and float(result.zeros.max()) <= grid.maxq, name
        if grid.symmetric:
            assert bool((result.zeros == (grid.maxq + 1) / 2).all()), name

        g_idx = result.g_idx
        assert g_idx.dtype == torch.int32 and g_idx.shape == (cols,), name
        size = cols if grid.group_size == -1 else grid.group_size
        counts = torch.bincount(g_idx.long(), minlength=n_groups)
        assert counts.tolist() == [size] * n_groups, name
        if not act_order:
            assert torch.equal(g_idx.long(), torch.arange(cols) // size), name

        for g in range(n_groups):  # column by column through the grid's own API
            columns = g_idx == g
            scale, zero = result.scales[:, g], result.zeros[:, g]
            group_codes = codes[:, columns].float()
            assert torch.equal(weight[:, columns], grid.dequantize(group_codes, scale, zero)), name
            # the weight is a fixed point of its grid: rounding it again gives its codes
            assert torch.equal(grid.quantize(weight[:, columns], scale, zero), group_codes), name


# -- (b) rounded weights lie on the grid ------------------------------------------------------
GRID_CASES = [
    pytest.param("epmq", QuantGrid(8), False, id="epmq-8bit-per-channel"),
    pytest.param("epmq", QuantGrid(4, group_size=16), False, id="epmq-4bit-g16"),
    pytest.param(
        "gptq", QuantGrid(3, group_size=16, symmetric=True), True, id="gptq-3bit-g16-sym-actorder"
    ),
]


@pytest.mark.parametrize("family", ["bert", "clip", "t5", "llama"])
@pytest.mark.parametrize(("method", "grid", "act_order"), GRID_CASES)
def test_rounded_weights_lie_on_the_grid(
    families: Callable[[str], FamilySetup],
    family: str,
    method: str,
    grid: QuantGrid,
    act_order: bool,
) -> None:
    setup = families(family)
    model, run = setup.quantize(method, grid=grid, act_order=act_order)
    assert_on_grid(model, setup.adapter(), run, grid, act_order)
    merged = dict(setup.merged().named_parameters())
    moved = [
        n
        for n in run.results
        if not torch.equal(model.get_submodule(n).weight, merged[f"{n}.weight"])
    ]
    assert moved == list(run.results)  # every linear was actually rounded in place


# -- (d) interrupted + resumed equals uninterrupted -------------------------------------------
class Interrupt(Exception):
    pass


def stop_at(stage: str, block: int) -> Callable[[str, int], None]:
    def callback(stage_name: str, index: int) -> None:
        if (stage_name, index) == (stage, block):
            raise Interrupt

    return callback


RESUME_POINTS = [
    pytest.param("clip", ("vision", 0), id="clip-after-vision0"),
    pytest.param("llama", ("decoder", 0), id="llama-after-decoder0"),
    pytest.param("t5", ("encoder", 0), id="t5-after-encoder0"),
    pytest.param("t5", ("decoder", 0), id="t5-after-decoder0"),
]
RESUME_CASES = [("gptq", "quantized"), ("epmq", "expert"), ("epmq", "merged")]


@pytest.mark.parametrize(("family", "stop"), RESUME_POINTS)
@pytest.mark.parametrize(("method", "x_source"), RESUME_CASES)
def test_resume_equals_uninterrupted(
    families: Callable[[str], FamilySetup],
    tmp_path: Path,
    family: str,
    stop: tuple[str, int],
    method: str,
    x_source: str,
) -> None:
    setup = families(family)
    calib = {task: batches[:1] for task, batches in setup.calib.items()}  # one batch: fast
    grid = QuantGrid(4, group_size=16)
    kwargs = dict(
        method=method, grid=grid, experts=setup.experts, x_source=x_source,
        **params_for(method, alpha=0.05),
    )  # fmt: skip
    full = setup.merged()
    reference = quantize_model(
        full, setup.adapter(), calib, **kwargs, engine=EngineOptions(progress=False)
    )

    order = setup.block_order()
    done = order.index(stop) + 1
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        quantize_model(
            setup.merged(),
            setup.adapter(),
            calib,
            **kwargs,
            engine=EngineOptions(progress=False, checkpoint_dir=ckpt, on_block_end=stop_at(*stop)),
        )
    for i, (stage, index) in enumerate(order):
        saved = (ckpt / f"{stage}-block-{index:04d}.safetensors").is_file()
        assert saved == (i < done), (stage, index)

    seen: list[tuple[str, int]] = []
    resumed_model = setup.merged()  # a fresh process would reload the merged model
    resumed = quantize_model(
        resumed_model,
        setup.adapter(),
        calib,
        **kwargs,
        engine=EngineOptions(
            progress=False,
            checkpoint_dir=ckpt,
            on_block_end=lambda stage, index: seen.append((stage, index)),
        ),
    )
    assert resumed.resumed_blocks == done
    assert seen == order  # the resumed run went on through every later block and stage
    for stage, index in order[done:]:  # ... and solved (and saved) the ones not yet done
        assert (ckpt / f"{stage}-block-{index:04d}.safetensors").is_file(), (stage, index)
    assert {r.stage for r in resumed.layers} == {stage for stage, _ in order}

    named = dict(resumed_model.named_parameters())
    assert list(named) == [name for name, _ in full.named_parameters()]
    for name, param in full.named_parameters():
        assert torch.equal(param, named[name]), name

    assert [r.name for r in resumed.layers] == [r.name for r in reference.layers]
    assert [r.proxy_loss for r in resumed.layers] == pytest.approx(
        [r.proxy_loss for r in reference.layers], rel=0, abs=0, nan_ok=True
    )
    assert list(resumed.results) == list(reference.results)
    for name, result in reference.results.items():
        other = resumed.results[name]
        for key in ("weight", "codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(result, key), getattr(other, key)), (name, key)
    assert_on_grid(resumed_model, setup.adapter(), resumed, grid, act_order=False)
