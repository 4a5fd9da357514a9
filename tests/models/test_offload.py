"""Activations offloaded to disk (``offload_dir``) give the same weights as in memory."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_family_resume_and_grid import FamilySetup, families  # noqa: F401 (fixture)

from epmq.calib import EngineOptions
from epmq.calib.capture import BlockCall
from epmq.calib.offload import ActivationFiles
from epmq.calib.propagate import propagate_calls
from epmq.calib.targets import expert_blocks
from epmq.errors import EpmqError
from epmq.models.adapter import BlockAdapter, Stage


def _assert_same(a: tuple[torch.nn.Module, Any], b: tuple[torch.nn.Module, Any]) -> None:
    (model, run), (reference, ref_run) = a, b
    for (name, x), y in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(x, y), name
    assert run.results.keys() == ref_run.results.keys()
    for name, result in run.results.items():
        assert torch.equal(result.codes, ref_run.results[name].codes), name
        assert torch.equal(result.scales, ref_run.results[name].scales), name
    assert [r.proxy_loss for r in run.layers] == [r.proxy_loss for r in ref_run.layers]


@pytest.mark.parametrize("family", ["llama", "bert", "t5"])
@pytest.mark.parametrize(
    ("method", "x_source"), [("gptq", "quantized"), ("epmq", "expert"), ("gptq", "merged")]
)
def test_offloaded_run_gives_the_same_weights(
    families: Callable[[str], FamilySetup],  # noqa: F811
    tmp_path: Path,
    family: str,
    method: str,
    x_source: str,
) -> None:
    setup = families(family)
    offload = tmp_path / "activations"
    seen: list[int] = []

    def count_files(stage: str, index: int) -> None:
        seen.append(len(list(offload.rglob("*.safetensors"))))

    engine = EngineOptions(progress=False, offload_dir=offload, on_block_end=count_files)
    offloaded = setup.quantize(method, x_source, engine=engine)
    in_memory = setup.quantize(method, x_source)
    _assert_same(offloaded, in_memory)
    tasks = len(setup.calib)
    assert min(seen) >= tasks  # every task's activations were in files between blocks ...
    assert max(seen) <= 2 * tasks  # ... one file per task per stream (or stage)
    assert list(offload.iterdir()) == []  # ... and deleted when the run ended


def test_offloaded_norm_correction_gives_the_same_weights(
    families: Callable[[str], FamilySetup],  # noqa: F811
    tmp_path: Path,
) -> None:
    setup = families("llama")
    engine = EngineOptions(progress=False, offload_dir=tmp_path)
    offloaded = setup.quantize("epmq", "expert", engine=engine, norm_correction=True)
    in_memory = setup.quantize("epmq", "expert", norm_correction=True)
    _assert_same(offloaded, in_memory)


def test_offload_dir_that_is_a_file_is_one_clear_error(
    families: Callable[[str], FamilySetup],  # noqa: F811
    tmp_path: Path,
) -> None:
    setup = families("bert")
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    engine = EngineOptions(progress=False, offload_dir=blocker)
    with pytest.raises(EpmqError, match="offload_dir"):
        setup.quantize("gptq", "quantized", engine=engine)


def test_offloaded_streams_round_trip_bit_for_bit(tmp_path: Path) -> None:
    files = ActivationFiles(tmp_path, BlockAdapter())
    streams = files.streams()
    hidden = [torch.randn(2, 3, 4, dtype=torch.bfloat16), torch.randn(1, 5, 4)]
    mask = torch.ones(2, 3, dtype=torch.bool)
    streams["t"] = [BlockCall((h,), {"scale": 2}, mask) for h in hidden]
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    back = streams["t"]
    for call, h in zip(back, hidden, strict=True):
        assert call.args[0].dtype == h.dtype and torch.equal(call.args[0], h)
        assert call.kwargs == {"scale": 2} and call.mask is mask
    streams["t"] = back  # rewritten: the old file is gone
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    files.close()
    assert list(tmp_path.iterdir()) == []


class _Adapter(BlockAdapter):
    def next_block_inputs(self, stage: Stage, index: int, output: Any, args: Any, kwargs: Any):
        return (output,), kwargs


def test_propagation_frees_each_input_as_its_output_is_made() -> None:
    block = torch.nn.Linear(4, 4)
    inputs = [torch.randn(3, 4) for _ in range(3)]
    refs = [weakref.ref(x) for x in inputs]
    calls = [BlockCall((x,), {}, None) for x in inputs]
    freed_before: list[bool] = []

    def check(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        freed_before.append(all(r() is None for r in refs[: len(freed_before)]))

    del inputs
    handle = block.register_forward_pre_hook(check)
    with torch.no_grad():
        out = propagate_calls(_Adapter(), Stage("s", "blocks"), 0, block, calls)
    handle.remove()
    assert out is calls and freed_before == [True, True, True]  # earlier inputs already gone
    assert all(r() is None for r in refs)


def test_expert_blocks_share_the_experts_tensors() -> None:
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    state = {n: torch.randn_like(p) for n, p in block.named_parameters()}
    (twin,) = expert_blocks(block, [state])
    for name, param in twin.named_parameters():
        assert param.data_ptr() == state[name].data_ptr(), name  # held once, not copied
    for name, param in block.named_parameters():
        assert not torch.equal(param, state[name])  # the block keeps its own tensors
    x = torch.randn(2, 4)
    expected = torch.nn.functional.layer_norm(
        x @ state["0.weight"].T + state["0.bias"], (4,), state["1.weight"], state["1.bias"]
    )
    assert torch.allclose(twin(x), expected)
