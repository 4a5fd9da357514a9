"""Exact reuse of sub-module outputs across a block's true-sequential passes.

True-sequential calibration runs a block once per linear group (q/k/v, then the attention
output, then the MLP up and down projections) and once more to propagate: each pass recomputes
the whole prefix of the block. Once every linear inside a sub-module (say the attention) is
solved, and no linear still to be solved runs before it, its output can no longer change: it
depends only on the block's input and on solved weights. :class:`FinalOutputs` records such
outputs in one pass and serves them in the later passes instead of running the sub-module
again, so the attention of a BERT or Llama block runs three times per block instead of five.

Exactness: an output is recorded only when no unsolved linear ran in that forward before the
sub-module finished, it is stored as a copy and served as a fresh copy (in-place operations
downstream cannot corrupt it), and a sub-module is served only after a pass recorded it for
every (task, batch) call. Outputs larger than the block's hidden states are not kept (memory
stays at about one more copy of the calibration activations). The last pass over the block
(propagation) records nothing, since nothing would read it, and hands each served output over
instead of copying it, dropping it as it goes: the copies are gone when the next block's inputs
are complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from epmq.calib.capture import map_tensors

Key = tuple[str, int]  # (task, batch index)


def _numel(value: Any) -> int:
    """Elements in every tensor inside ``value``."""
    sizes: list[int] = []
    map_tensors(value, lambda t: sizes.append(t.numel()) or t)
    return sum(sizes)


def _copy(value: Any) -> Any:
    """A copy of ``value`` whose tensors share no memory with it."""
    return map_tensors(value, lambda t: t.detach().clone())


class FinalOutputs:
    """Recorded outputs of a block's finished sub-modules (see the module docstring)."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        modules = dict(block.named_modules())
        self._linears = {
            name: {n for n, m in module.named_modules(prefix=name) if isinstance(m, nn.Linear)}
            for name, module in modules.items()
            if name
        }
        self.solved: set[str] = set()
        self.served: dict[str, dict[Key, Any]] = {}
        self._recorded: dict[str, dict[Key, Any]] = {}
        self._key: Key = ("", 0)
        self._limit = 0
        self._tainted = False
        self._calls = 0

    def mark_solved(self, names: list[str]) -> None:
        """Linears whose weights are final from now on."""
        self.solved.update(names)

    def forget(self, name: str) -> None:
        """Module ``name`` changed (an input scale folded into it): drop what contains it."""
        for outer in [o for o in self.served if name == o or name.startswith(f"{o}.")]:
            del self.served[outer]

    def _candidates(self) -> list[str]:
        """Sub-modules holding linears, all solved, not inside one already served. A lone
        linear is no candidate: serving its output saves one matmul and costs a copy of
        every task's activations (Llama's q, k, v would hold three)."""
        out = []
        for name, linears in self._linears.items():
            if not linears or not linears <= self.solved or name in self.served:
                continue
            if isinstance(self.block.get_submodule(name), nn.Linear):
                continue
            if any(name.startswith(f"{s}.") for s in self.served):
                continue
            out.append(name)
        return out

    @contextlib.contextmanager
    def pass_(self, *, last: bool = False) -> Iterator[None]:
        """One pass over every (task, batch) call: serve what is final, record what becomes so.

        ``last``: no pass follows; record nothing, and serve each output by handing over the
        kept copy (dropped from here, so the copies go as the pass advances).
        """
        unsolved = [n for n, m in self.block.named_modules() if isinstance(m, nn.Linear)]
        unsolved = [n for n in unsolved if n not in self.solved]
        handles = []
        for name in unsolved:
            module = self.block.get_submodule(name)
            handles.append(module.register_forward_pre_hook(self._taint))
        candidates = [] if last else self._candidates()
        self._recorded = {name: {} for name in candidates}
        for name in candidates:
            module = self.block.get_submodule(name)
            handles.append(module.register_forward_hook(self._recorder(name)))
        patched = []
        for name, outputs in self.served.items():
            module = self.block.get_submodule(name)
            module.forward = self._server(outputs, last)  # instance attribute shadows the method
            patched.append(module)
        self._calls = 0
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module in patched:
                del module.forward
            if last:
                self.served = {}
        for name, outputs in self._recorded.items():
            if self._calls and len(outputs) == self._calls:
                self.served[name] = outputs
        for name in list(self.served):  # an outer module now serves: drop its parts
            if any(name.startswith(f"{outer}.") for outer in self.served):
                del self.served[name]
        self._recorded = {}

    @contextlib.contextmanager
    def call(self, task: str, index: int, hidden: Tensor | None) -> Iterator[None]:
        """Around one block call of the current pass (``hidden``: the block's input)."""
        self._key = (task, index)
        self._limit = 0 if hidden is None else hidden.numel()
        self._tainted = False
        self._calls += 1
        yield

    def _taint(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._tainted = True

    def _recorder(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._tainted or name not in self._recorded:
                return
            if self._key in self._recorded[name]:  # called twice in one forward: not reusable
                del self._recorded[name]
                return
            if _numel(output) > self._limit:
                del self._recorded[name]  # too large to keep: never served
                return
            self._recorded[name][self._key] = _copy(output)

        return hook

    def _server(self, outputs: dict[Key, Any], last: bool) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if last:  # nobody reads this copy again: hand it over
                return outputs.pop(self._key)
            return _copy(outputs[self._key])

        return forward
