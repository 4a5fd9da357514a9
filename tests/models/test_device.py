"""Where calibration runs: device names, sequential onloading, half-precision models.

On a machine without a GPU the onloading machinery still runs: a :class:`Placement` forced
to "move" every block to the CPU enters every context (stage capture, per-block onload, hooks
on the blocks a capture runs through, results brought home) and must give the same bits as
the plain run. The CUDA cases (model in CPU memory, blocks on the GPU) are skipped without
one and compare with the CPU run within float noise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import test_family_resume_and_grid as family_tests
import torch
from test_family_resume_and_grid import FamilySetup, Interrupt, assert_on_grid, stop_at

from epmq.calib import EngineOptions, engine, quantize_model
from epmq.calib.onload import Onloaded, Placement
from epmq.devices import module_device, resolve_device
from epmq.errors import EpmqError
from epmq.experiment.config import parse_config
from epmq.export.quantized import check_weight
from epmq.quant import QuantGrid

FAMILIES = ["bert", "clip", "t5", "llama"]
CASES = [
    pytest.param("gptq", "quantized", id="gptq"),
    pytest.param("epmq", "expert", id="epmq-expert"),
    pytest.param("epmq", "merged", id="epmq-merged"),
]
GRID = QuantGrid(4, group_size=16)
families = family_tests.families  # the module-scoped fixture: tiny models and their experts
has_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_device_names() -> None:
    assert resolve_device(None) is None
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    for bad in ("tpu", "cuda:x", "gpu0", ""):
        with pytest.raises(EpmqError, match="device must be"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(EpmqError, match="no CUDA GPU"):
            resolve_device("cuda:0")


def test_config_device_field() -> None:
    base = {"suite": "tiny"}
    assert parse_config(base).device == "auto"
    assert parse_config({**base, "device": "CUDA:1"}).device == "cuda:1"
    with pytest.raises(EpmqError, match=r"device: .*device must be"):
        parse_config({**base, "device": "tpu"}, "run.yaml")


def _run(setup: FamilySetup, method: str, x_source: str, device: str | None = None) -> tuple:
    engine = EngineOptions(progress=False, device=device)
    return setup.quantize(method, x_source, grid=GRID, engine=engine)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("method", "x_source"), CASES)
def test_forced_onloading_is_bit_identical(
    families: Callable[[str], FamilySetup],
    family: str,
    method: str,
    x_source: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    setup = families(family)
    plain_model, plain = _run(setup, method, x_source)

    entered = {"stage": 0, "block": 0, "moved": 0}

    def forced(model, adapter, stages, device):  # type: ignore[no-untyped-def]
        blocks = [b for s in stages for b in adapter.blocks(model, s)]
        return Placement(model, torch.device("cpu"), blocks)  # "moves" to where it is

    real_stage, real_block, real_enter = Placement.stage, Placement.block, Onloaded.__enter__

    def count(key: str, real):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            entered[key] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(engine.Placement, "of", staticmethod(forced))
    monkeypatch.setattr(Placement, "stage", count("stage", real_stage))
    monkeypatch.setattr(Placement, "block", count("block", real_block))
    monkeypatch.setattr(Onloaded, "__enter__", count("moved", real_enter))
    model, run = _run(setup, method, x_source, device="cpu")

    n_blocks = len(setup.block_order())
    assert entered["block"] == n_blocks
    assert entered["stage"] >= len({stage for stage, _ in setup.block_order()})
    assert entered["moved"] >= n_blocks
    assert sorted(run.results) == sorted(plain.results)
    for name, result in run.results.items():
        ref = plain.results[name]
        assert torch.equal(result.codes, ref.codes), name
        assert torch.equal(result.weight, ref.weight), name
        weight = model.get_submodule(name).weight
        assert result.weight.data_ptr() == weight.data_ptr(), name  # one copy, not two
    for (name, p), q in zip(model.named_parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_bfloat16_model_is_solved_in_float32(families: Callable[[str], FamilySetup]) -> None:
    setup = families("llama")
    model = setup.merged().to(torch.bfloat16)
    run = quantize_model(
        model,
        setup.adapter(),
        setup.calib,
        method="epmq",
        grid=GRID,
        experts=setup.experts,
        alpha=0.05,
        x_source="expert",
        engine=EngineOptions(progress=False),
    )
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for name, result in run.results.items():
        # solved in float32; no float32 copy of the weight is kept beside the bfloat16 model
        assert result.weight is None and result.scales.dtype == torch.float32, name
        weight = model.get_submodule(name).weight
        assert torch.equal(weight, result.dequantized().to(torch.bfloat16)), name
        assert torch.isfinite(torch.tensor(result.proxy_loss)), name
        check_weight(name, result, tuple(weight.shape))  # exportable: parts consistent


def test_bfloat16_resumed_run_equals_uninterrupted(
    families: Callable[[str], FamilySetup], tmp_path: Path
) -> None:
    """A bfloat16 run resumed from its checkpoint gives the same codes, and results whose
    parts agree (the checkpoint holds the bfloat16 weights, never taken for the result's)."""
    setup = families("llama")
    calib = {task: batches[:1] for task, batches in setup.calib.items()}

    def run(**engine: object) -> tuple[torch.nn.Module, dict]:
        model = setup.merged().to(torch.bfloat16)
        done = quantize_model(
            model, setup.adapter(), calib, method="gptq", grid=GRID,
            engine=EngineOptions(progress=False, **engine),  # type: ignore[arg-type]
        )  # fmt: skip
        return model, done.results

    _, reference = run()
    first = setup.block_order()[0]
    with pytest.raises(Interrupt):
        run(checkpoint_dir=tmp_path / "ckpt", on_block_end=stop_at(*first))
    model, resumed = run(checkpoint_dir=tmp_path / "ckpt")
    for name, result in resumed.items():
        assert result.weight is None, name
        assert torch.equal(result.codes, reference[name].codes), name
        check_weight(name, result, tuple(model.get_submodule(name).weight.shape))


@has_cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("method", "x_source"), CASES)
def test_cuda_onloading_matches_cpu(
    families: Callable[[str], FamilySetup], family: str, method: str, x_source: str
) -> None:
    setup = families(family)
    _, cpu = _run(setup, method, x_source)
    model, gpu = _run(setup, method, x_source, device="cuda")
    assert module_device(model).type == "cpu"  # the model stayed in CPU memory
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert_on_grid(model, setup.adapter(), gpu, GRID, act_order=False)
    for name, result in gpu.results.items():
        ref = cpu.results[name]
        assert result.codes.device.type == "cpu", name
        same = (result.codes == ref.codes).float().mean().item()
        assert same > 0.97, (name, same)  # codes flip only on float-level ties
        assert result.proxy_loss == pytest.approx(ref.proxy_loss, rel=0.05, abs=1e-6), name
