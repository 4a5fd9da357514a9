"""Sequential onloading: the model waits in CPU memory, one block at a time runs on the device.

The calibration engine calls :func:`execution_device` once per run. When it differs from
where the model's parameters live, every block is moved to the device for its whole lifecycle
(calibrate, solve, propagate) and back into its *original* CPU storage when it is done
(:class:`Onloaded`), so tensors that share that storage (a quantized linear's result shares
the model's float32 weight) stay valid and nothing is allocated twice. The modules outside
the blocks (embeddings, final norms) are onloaded while a stage's first-block inputs are
captured; blocks of other stages that a capture runs through (a T5 decoder's capture runs the
encoder) are onloaded one at a time by forward hooks (:func:`blocks_onloaded_on_call`).
Activations (the block calls of every task) live on the device from capture to the end.

When the execution device is where the model already is (the CPU path, or a model already on
the GPU), nothing moves and the results are bit-identical to a run without this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from epmq.devices import module_device, resolve_device, same_device


def _own_tensors(module: nn.Module) -> Iterator[tuple[dict[str, Any], str]]:
    """``(container, key)`` of every parameter and buffer held directly by ``module``."""
    for key, value in module._parameters.items():
        if value is not None:
            yield module._parameters, key
    for key, value in module._buffers.items():
        if value is not None:
            yield module._buffers, key


class Onloaded:
    """Move the tensors of ``modules`` to ``device``; on exit put them back into their original
    storage (copying the device values back when ``write_back``). A no-op when they are there
    already. Parameters keep their identity (``param.data`` is swapped), buffers are replaced.
    """

    def __init__(
        self,
        modules: Iterable[nn.Module],
        device: torch.device,
        *,
        recurse: bool = True,
        write_back: bool = True,
    ) -> None:
        self.device = device
        self.write_back = write_back
        self._moved: list[tuple[dict[str, Any], str, Tensor]] = []
        seen: set[int] = set()
        self._slots: list[tuple[dict[str, Any], str]] = []
        for module in modules:
            for owner in module.modules() if recurse else [module]:
                for container, key in _own_tensors(owner):
                    if id(container[key]) not in seen:  # tied weights move once
                        seen.add(id(container[key]))
                        self._slots.append((container, key))

    def __enter__(self) -> Onloaded:
        for container, key in self._slots:
            value = container[key]
            if same_device(value.device, self.device):
                continue
            original = value.data
            moved = original.to(self.device, non_blocking=True)
            if isinstance(value, nn.Parameter):
                value.data = moved
            else:
                container[key] = moved
            self._moved.append((container, key, original))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for container, key, original in reversed(self._moved):
            value = container[key]
            if self.write_back and exc_type is None:
                original.copy_(value.data)
            if isinstance(value, nn.Parameter):
                value.data = original
            else:
                container[key] = original
        self._moved.clear()


@contextlib.contextmanager
def blocks_onloaded_on_call(blocks: Iterable[nn.Module], device: torch.device) -> Iterator[None]:
    """While open, each of ``blocks`` moves to ``device`` when it is called and back after
    (unchanged: nothing is written back). For the blocks of other stages that a capture runs
    through."""
    handles = []
    active: dict[int, Onloaded] = {}

    def before(module: nn.Module, args: Any) -> None:
        onload = Onloaded([module], device, write_back=False)
        active[id(module)] = onload
        onload.__enter__()

    def after(module: nn.Module, args: Any, output: Any) -> None:
        onload = active.pop(id(module), None)
        if onload is not None:
            onload.__exit__(None, None, None)

    try:
        for block in blocks:
            handles.append(block.register_forward_pre_hook(before))
            handles.append(block.register_forward_hook(after, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for onload in active.values():
            onload.__exit__(None, None, None)
        active.clear()


def outside_blocks(model: nn.Module, blocks: Iterable[nn.Module]) -> list[nn.Module]:
    """Every module of ``model`` that is neither one of ``blocks`` nor inside one."""
    inside: set[int] = set()
    for block in blocks:
        inside.update(id(m) for m in block.modules())
    return [m for m in model.modules() if id(m) not in inside]


class Placement:
    """Where one calibration run keeps the model and where its blocks run.

    ``device`` is None when the blocks run where the model is (nothing moves); otherwise
    :meth:`stage` and :meth:`block` onload what each step needs and :meth:`home` brings a
    block's outcome back to the model's device.
    """

    def __init__(
        self, model: nn.Module, device: torch.device | None, blocks: list[nn.Module]
    ) -> None:
        self.model = model
        self.model_device = module_device(model)
        self.device = device
        self.blocks = blocks

    @classmethod
    def of(
        cls,
        model: nn.Module,
        adapter: Any,
        stages: Iterable[Any],
        device: str | torch.device | None,
    ) -> Placement:
        """The placement of ``model`` for a run on ``device`` (see :func:`resolve_device`)."""
        target = resolve_device(device)
        if target is None or same_device(target, module_device(model)):
            return cls(model, None, [])
        return cls(model, target, [b for stage in stages for b in adapter.blocks(model, stage)])

    @property
    def moves(self) -> bool:
        """Whether blocks are onloaded (the run's device is not the model's)."""
        return self.device is not None

    def stage(self, stage: Any) -> contextlib.AbstractContextManager[Any]:
        """While a stage's first-block inputs are captured (and linked): every module outside
        the blocks on the device, and the blocks the capture runs through onloaded per call."""
        if self.device is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        rest = outside_blocks(self.model, self.blocks)
        stack.enter_context(Onloaded(rest, self.device, recurse=False, write_back=False))
        stack.enter_context(blocks_onloaded_on_call(self.blocks, self.device))
        return stack

    def block(self, block: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """The block on the device for its lifecycle; solved values written back after."""
        if self.device is None:
            return contextlib.nullcontext()
        return Onloaded([block], self.device)

    def home(self, outcome: Any) -> Any:
        """``outcome`` (a :class:`~epmq.calib.block.BlockOutcome`) with every tensor on the
        model's device; a result equal to its linear's weight shares that weight's storage."""
        if self.device is None:
            return outcome
        to_home = lambda t: t.to(self.model_device)  # noqa: E731
        outcome.weights = {k: to_home(v) for k, v in outcome.weights.items()}
        outcome.grams = {k: [to_home(g) for g in v] for k, v in outcome.grams.items()}
        for name, result in outcome.results.items():
            weight = self.model.get_submodule(name).weight.data
            if result.weight is not None:
                # the linear was written from this very result (calib/block.py) and Onloaded
                # copied it back: keep one copy, not two
                result.weight = weight
            result.codes = to_home(result.codes)
            result.scales = to_home(result.scales)
            result.zeros = to_home(result.zeros)
            result.g_idx = to_home(result.g_idx)
        return outcome
