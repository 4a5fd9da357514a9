"""Activations offloaded to disk (``offload_dir``): a block's calls with their hidden states in
files, one task in memory at a time.

The engine holds every task's block calls (an activation stream, :data:`Streams`) from one
block to the next; in memory that is every task's hidden states, twice with a second stream
(the experts'). When even that does not fit, :class:`OffloadedStreams` keeps each task's
hidden states in one safetensors file under a private folder of ``offload_dir`` and the rest
of its calls (masks, rotary embeddings, T5's position bias: the same for every block or small)
in memory. Reading ``streams[task]`` loads that task's calls whole; assigning
``streams[task] = calls`` writes them to a new file and deletes the old one. The lifecycle
reads one task, runs it through the block and, when propagating, writes it back before the
next task is read, so memory holds one task's activations (inputs and outputs) whatever K is.

Values round-trip bit for bit (safetensors stores the raw bytes), so a run with offloading
gives the same weights as one without. The reuse of finished sub-modules' outputs
(calib/reuse.py), which keeps one more copy of every task's activations in memory, is off
when offloading: the sub-modules are recomputed (exact, as reuse is), at some time cost.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterator, MutableMapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from epmq.calib.capture import BlockCall, Streams
from epmq.errors import EpmqError
from epmq.models.adapter import BlockAdapter


class OffloadedStreams(MutableMapping[str, list[BlockCall]]):
    """Block calls of every task whose hidden states live in ``folder`` (module docs)."""

    def __init__(self, folder: Path, adapter: BlockAdapter) -> None:
        self.folder = folder
        self.adapter = adapter
        self._skeletons: dict[str, list[BlockCall]] = {}  # calls with hidden states = None
        self._files: dict[str, Path] = {}
        self._devices: dict[str, torch.device] = {}
        self._numbers = itertools.count()

    def __getitem__(self, task: str) -> list[BlockCall]:
        from safetensors.torch import load_file

        skeletons = self._skeletons[task]
        if not skeletons:
            return []
        hidden = load_file(str(self._files[task]), device=str(self._devices[task]))
        return [self._filled(call, hidden.pop(str(b))) for b, call in enumerate(skeletons)]

    def __setitem__(self, task: str, calls: list[BlockCall]) -> None:
        from safetensors.torch import save_file

        tensors = {}
        skeletons = []
        for b, call in enumerate(calls):
            hidden = self.adapter.hidden_states(call.args, call.kwargs)
            tensors[str(b)] = hidden.detach().contiguous()
            args, kwargs = self.adapter.with_hidden_states(call.args, call.kwargs, None)  # type: ignore[arg-type]
            skeletons.append(replace(call, args=args, kwargs=kwargs))
        file = self.folder / f"{next(self._numbers)}.safetensors"
        try:
            save_file(tensors, str(file))
        except OSError as exc:
            raise EpmqError(f"offload_dir: cannot write activations to {file} ({exc})") from None
        old = self._files.get(task)
        self._files[task] = file
        self._skeletons[task] = skeletons
        if tensors:
            self._devices[task] = tensors["0"].device
        if old is not None:
            old.unlink(missing_ok=True)

    def __delitem__(self, task: str) -> None:
        self._files.pop(task).unlink(missing_ok=True)
        del self._skeletons[task]

    def __iter__(self) -> Iterator[str]:
        return iter(self._skeletons)

    def __len__(self) -> int:
        return len(self._skeletons)

    def _filled(self, call: BlockCall, hidden: Tensor) -> BlockCall:
        args, kwargs = self.adapter.with_hidden_states(call.args, call.kwargs, hidden)
        return replace(call, args=args, kwargs=kwargs)


class ActivationFiles:
    """A private folder under ``offload_dir`` holding every offloaded stream of one run;
    removed with its files when the run ends (also on errors)."""

    def __init__(self, offload_dir: str | Path, adapter: BlockAdapter) -> None:
        root = Path(offload_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="epmq-activations-", dir=root))
        except OSError as exc:
            raise EpmqError(f"offload_dir: cannot create a folder in {root} ({exc})") from None
        self.adapter = adapter
        self._count = itertools.count()

    def streams(self) -> OffloadedStreams:
        """A new, empty stream with its own subfolder."""
        folder = self.folder / str(next(self._count))
        folder.mkdir()
        return OffloadedStreams(folder, self.adapter)

    def close(self) -> None:
        """Delete the folder and every file in it."""
        shutil.rmtree(self.folder, ignore_errors=True)


def new_streams(files: ActivationFiles | None) -> Streams:
    """An empty stream: in memory, or in ``files``' folder."""
    return {} if files is None else files.streams()
