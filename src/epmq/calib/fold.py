"""Input scales (AWQ): which linears share one rescalable input, and folding ``1 / s`` there.

A solver that declares ``input_scales`` solves each linear for the inputs ``x / s``; the model
then must feed it ``x / s``. The adapter names the module producing each linear's input
(``BlockAdapter.input_producers``); its output channels are divided by ``s`` here:

- a linear already solved in this block (V before O, up before down): the rows of its grid
  scales are divided by ``s`` (``scale_r (c − z) / s_r`` is on the grid with scale
  ``scale_r / s_r``, same codes), its weight re-dequantized from them, its bias divided;
- any other module (a norm): its weight and bias are divided by ``s``.

Every tensor changed is recorded in the block's outcome (``weights``, keyed by module name, and
``<module>.bias``), so a resumed run replays it. The model and its export stay equal: a
quantized weight is always ``dequantize(codes, scales, zeros, g_idx)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from epmq.calib.solve import SolveOptions, input_scale
from epmq.quant import QuantResult
from epmq.quant.solvers import LayerProblem


def producer_groups(
    block: nn.Module, producers: Mapping[str, str], names: list[str]
) -> dict[str, list[str]]:
    """Producer -> the linears of ``names`` it feeds, where every reader of its output is in
    ``names`` and its output width matches their inputs (else those linears keep ``s = 1``)."""
    modules = dict(block.named_modules())
    groups: dict[str, list[str]] = {}
    for name in names:
        if name in producers and producers[name] in modules:
            groups.setdefault(producers[name], []).append(name)
    out = {}
    for producer, readers in groups.items():
        every = [n for n, p in producers.items() if p == producer and n in modules]
        width = _channels(modules[producer])
        if sorted(every) != sorted(readers) or width is None:
            continue
        if all(getattr(modules[n], "in_features", None) == width for n in readers):
            out[producer] = readers
    return out


def _channels(module: nn.Module) -> int | None:
    """Output channels of a module whose channel c scales with ``weight[c]`` (and bias)."""
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 1:
        return int(weight.numel())
    return None


@torch.no_grad()
def fold_input_scale(
    block: nn.Module,
    prefix: str,
    producer: str,
    s: Tensor,
    weights: dict[str, Tensor],
    results: dict[str, QuantResult],
) -> None:
    """Divide the output channels of ``block``'s ``producer`` by ``s`` (module docstring)."""
    module = block.get_submodule(producer)
    full = f"{prefix}.{producer}"
    weight: Any = module.weight
    result = results.get(full)
    if result is not None:
        result.scales = result.scales / s.to(result.scales)[:, None]
        result.weight = result.dequantize()
        weight.data.copy_(result.weight.to(weight.dtype))
        result.share_with(weight.data)  # one copy, as the block keeps its results
    else:
        shape = (-1,) + (1,) * (weight.dim() - 1)
        weight.data.copy_((weight.data.float() / s.view(shape).float()).to(weight.dtype))
    weights[full] = weight.detach().clone()
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        bias.data.copy_((bias.data.float() / s.float()).to(bias.dtype))
        weights[f"{full}.bias"] = bias.detach().clone()


def search_input_scales(
    block: nn.Module,
    producers: Mapping[str, str],
    names: list[str],
    problem_of: Callable[[str], LayerProblem] | None,
    options: SolveOptions,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The solver's input scales for the linears of ``names``: by producer (to fold) and by
    linear (to solve with). All readers of one producer share one ``s``; there is none where
    the solver keeps ``s = 1``, declares no search, or there are no statistics (None)."""
    if options.solver.input_scales is None or problem_of is None:
        return {}, {}
    by_producer, by_linear = {}, {}
    for producer, readers in producer_groups(block, producers, names).items():
        s = input_scale([problem_of(n) for n in readers], options)
        if s is not None:
            by_producer[producer] = s
            by_linear.update(dict.fromkeys(readers, s))
    return by_producer, by_linear
