"""The model-adapter protocol: what the calibration engine needs to know about a model family.

The engine (``epmq.calib``) walks a model block by block, the way GPTQ, GPTQModel and
llm-compressor do:

1. **capture** — run the model on a calibration batch with a forward pre-hook on the first
   block of a *stage* that records the block's ``(args, kwargs)`` and raises
   :class:`StopForward` (the GPTQ "Catcher"). Everything the block needs — the extended
   attention mask (BERT), rotary ``position_embeddings`` and the causal mask (Llama), the
   final encoder output (T5 decoder) — is captured as the model itself computes it.
2. **calibrate / solve** — forward hooks on the block's linear layers accumulate statistics;
   the linears are solved group by group (:meth:`BlockAdapter.linear_groups`).
3. **propagate** — the block is re-run and :meth:`BlockAdapter.next_block_inputs` turns its
   output into the next block's inputs (T5: the first block's relative position bias is
   carried on to the later blocks).

A model is one or more :class:`Stage` s run in order (BERT, CLIP vision, Llama: one stage;
T5: the encoder stack, then the decoder stack). Each stage is captured afresh after the
previous stages are solved, so a T5 decoder sees the encoder as quantized so far.

An adapter class is also the one description of its model family: its ``family`` name, the
``config.model_type`` values it handles, its loader (:meth:`BlockAdapter.load`) and the
task-heads class that runs users' tasks on it (:attr:`BlockAdapter.tasks`). Adapters subclass
:class:`BlockAdapter`, override what differs from the defaults, and register with
:func:`register_adapter`; :mod:`epmq.models.registry` answers every question by family,
``model_type``, folder or model from those declarations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from epmq.errors import EpmqError

BlockArgs = tuple[Any, ...]
BlockKwargs = dict[str, Any]
Batch = Mapping[str, Any]


# Keyword names a block's KV cache has had across transformers releases (5.24: ``cache``).
CACHE_KWARGS: tuple[str, ...] = ("past_key_values", "past_key_value", "cache")


class StopForward(Exception):
    """Raised by the capture hook to stop the model's forward at a stage's first block."""


@dataclass(frozen=True)
class Stage:
    """A stack of identical blocks run in sequence.

    ``name`` is a short label ("encoder", "decoder", "layers"); ``blocks_path`` the dotted path
    of the ``nn.ModuleList`` holding the blocks, relative to the model given to the engine
    (e.g. ``"encoder.layer"`` for ``BertModel``, ``"bert.encoder.layer"`` for
    ``BertForSequenceClassification``). Parameter names of block ``i``'s linears are
    ``f"{blocks_path}.{i}.{linear}.weight"``.
    """

    name: str
    blocks_path: str


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an :class:`EpmqError` naming the path."""
    try:
        return model.get_submodule(path) if path else model
    except AttributeError as exc:
        raise EpmqError(f"model {type(model).__name__} has no submodule {path!r}") from exc


class BlockAdapter:
    """Default behaviour shared by transformer families; subclasses override what differs.

    Subclasses declare their family (``family``, ``model_types``, ``tasks``), implement
    :meth:`load` and :meth:`stages`. Everything else has a default that fits blocks called as
    ``block(hidden_states, *rest, **kwargs)`` and returning a tensor or a tuple whose first
    element is the new hidden states.
    """

    #: The family's name (config ``family:``, results, the CLI's messages).
    family: ClassVar[str] = "generic"
    #: The ``config.model_type`` values this family handles (one family per value).
    model_types: ClassVar[tuple[str, ...]] = ()
    #: The task-heads class serving this family, as ``"module:Class"`` (a
    #: :class:`epmq.heads.base.FamilyTasks` subclass; resolved by :func:`epmq.heads.tasks_class`,
    #: so that models never import heads). Empty: the family quantizes but runs no tasks.
    tasks: ClassVar[str] = ""

    # -- which models ---------------------------------------------------------------------
    @staticmethod
    def load(path: str | Path, **kwargs: Any) -> nn.Module:
        """Load the family's model saved in the local folder ``path`` (eval mode, no hub)."""
        raise NotImplementedError

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter handles ``model`` (by ``config.model_type`` by default)."""
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in cls.model_types

    def stages(self, model: nn.Module) -> list[Stage]:
        """The model's block stacks, in the order the engine solves them."""
        raise NotImplementedError

    def blocks(self, model: nn.Module, stage: Stage) -> nn.ModuleList:
        """The block list of ``stage``."""
        blocks = get_submodule(model, stage.blocks_path)
        if not isinstance(blocks, nn.ModuleList):
            raise EpmqError(f"{stage.blocks_path!r} is {type(blocks).__name__}, not a ModuleList")
        return blocks

    # -- what is solved -------------------------------------------------------------------
    #: True-sequential groups of linear names (relative to a block), in solving order.
    sequential_groups: ClassVar[tuple[tuple[str, ...], ...]] = ()
    #: Linear name -> the module producing its input (relative to a block), where that
    #: module's output channels can absorb a per-channel factor: a norm (weight and bias) or
    #: a linear (rows), with only channel-wise ops between, and every reader of that output
    #: listed. Solvers that rescale inputs (AWQ) fold ``1 / s`` there; unlisted linears keep
    #: ``s = 1``.
    input_producers: ClassVar[Mapping[str, str]] = {}
    #: The block's LayerNorms / RMSNorms in forward order, each with the linear producing
    #: its input (None: the block's input). Norm correction (``epmq.calib.norms``) refits
    #: their affine after that linear's group is solved and before the linears reading it.
    norm_sites: ClassVar[tuple[tuple[str, str | None], ...]] = ()

    def linear_groups(self, block: nn.Module) -> list[list[str]]:
        """Names (relative to ``block``) of the linears to solve, in true-sequential groups.

        Linears of one group read the same inputs and are solved together; groups are solved
        in order, each seeing the inputs produced by the groups solved before it
        (``true_sequential``). The default follows :attr:`sequential_groups` (q/k/v, then
        out, then up, then down) via :func:`grouped_linears`.
        """
        return grouped_linears(block, self.sequential_groups)

    def norms(self, block: nn.Module) -> list[tuple[str, str | None]]:
        """The block's norms whose affine can be refitted, as ``(norm, producing linear)``
        (names relative to ``block``, forward order): :attr:`norm_sites` that ``block`` holds
        with a per-channel ``weight``."""
        modules = dict(block.named_modules())
        sites = []
        for norm, producer in self.norm_sites:
            weight = getattr(modules.get(norm), "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 1:
                sites.append((norm, producer if producer in modules else None))
        return sites

    def find_stage(self, model: nn.Module, name: str, paths: Sequence[str]) -> Stage:
        """The stage at the first of ``paths`` that is an ``nn.ModuleList`` in ``model``."""
        for path in paths:
            try:
                blocks = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(blocks, nn.ModuleList):
                return Stage(name, path)
        raise EpmqError(
            f"model {type(model).__name__} has no {self.family} block list "
            f"(looked for {', '.join(paths)})"
        )

    # -- capture --------------------------------------------------------------------------
    def run_model(self, model: nn.Module, batch: Batch) -> None:
        """Run ``model`` on one calibration batch (the capture hook stops it early).

        ``batch`` holds the model's keyword inputs (``input_ids``, ``attention_mask``,
        ``pixel_values``, ...). Override to add inputs the family needs (T5:
        ``decoder_input_ids``) or to switch caches off.
        """
        model(**batch)

    def prepare_block_inputs(
        self, stage: Stage, args: BlockArgs, kwargs: BlockKwargs
    ) -> tuple[BlockArgs, BlockKwargs]:
        """Clean the captured first-block inputs before they are replayed (drop caches)."""
        kwargs = dict(kwargs)
        for name in CACHE_KWARGS:  # the name differs across transformers releases
            if name in kwargs:
                kwargs[name] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        return args, kwargs

    def token_mask(self, stage: Stage, batch: Batch) -> torch.Tensor | None:
        """A ``[batch, seq]`` bool mask of the tokens whose activations count in statistics.

        The mask of the stage's own token sequence, used for every linear unless
        :meth:`linear_token_mask` names another. A linear input ``[batch, seq, in]`` whose
        leading shape matches its mask is filtered by it (padding is left out of the Grams);
        an input of another shape counts whole. ``None``: every token counts. The default
        uses the batch's ``attention_mask`` when there is one.
        """
        mask = batch.get("attention_mask")
        return None if mask is None else mask.bool()

    def linear_token_mask(self, stage: Stage, batch: Batch, linear: str) -> torch.Tensor | None:
        """The token mask of linear ``linear`` (a name relative to a block of ``stage``).

        Linears that read another sequence than the stage's own override this: T5's decoder
        cross-attention ``k``/``v`` read the encoder states, whose padding is the encoder's
        ``attention_mask``. The default is :meth:`token_mask` for every linear.
        """
        return self.token_mask(stage, batch)

    # -- propagate ------------------------------------------------------------------------
    def hidden_states(self, args: BlockArgs, kwargs: BlockKwargs) -> torch.Tensor:
        """The hidden-states input of a block call."""
        return args[0] if args else kwargs["hidden_states"]

    def with_hidden_states(
        self, args: BlockArgs, kwargs: BlockKwargs, hidden: torch.Tensor
    ) -> tuple[BlockArgs, BlockKwargs]:
        """The same block call with its hidden-states input replaced."""
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def block_output(self, output: Any) -> torch.Tensor:
        """The new hidden states in a block's output (tensor, or first tuple element)."""
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, Sequence):
            return output[0]
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            raise EpmqError(f"cannot find hidden states in a block output of {type(output)}")
        return hidden

    def next_block_inputs(
        self, stage: Stage, index: int, output: Any, args: BlockArgs, kwargs: BlockKwargs
    ) -> tuple[BlockArgs, BlockKwargs]:
        """Inputs of block ``index + 1`` from block ``index``'s output and call.

        The default replaces the hidden states and keeps every other argument. T5 overrides
        this to pass the position bias computed by the first block on to later blocks.
        """
        return self.with_hidden_states(args, kwargs, self.block_output(output))

    def link_stage(
        self,
        model: nn.Module,
        stage: Stage,
        previous_output: torch.Tensor,
        args: BlockArgs,
        kwargs: BlockKwargs,
    ) -> tuple[BlockArgs, BlockKwargs]:
        """Feed a previous stage's final hidden states into this stage's first-block inputs.

        Used for the ``expert`` activation stream, which runs an expert's own blocks and never
        goes through the model's forward: for a T5 decoder, replace ``encoder_hidden_states``
        by ``encoder.final_layer_norm(previous_output)``. ``args``/``kwargs`` are the
        deployed model's captured inputs for this stage. The default keeps them unchanged
        (one-stage models never call this).
        """
        return args, kwargs


def check_group_sizes(
    model: nn.Module, adapter: BlockAdapter, group_sizes: Sequence[int], what: str
) -> int:
    """Raise :class:`EpmqError` (``what`` names the option or field) unless every group size
    divides the input width of every linear the quantizers solve (-1: per channel); returns
    how many linears that is."""
    count = 0
    for stage in adapter.stages(model):
        for index, block in enumerate(adapter.blocks(model, stage)):
            for group in adapter.linear_groups(block):
                for name in group:
                    width = block.get_submodule(name).in_features
                    count += 1
                    for size in group_sizes:
                        if size > 0 and width % size:
                            raise EpmqError(
                                f"{what} {size} does not divide the input width {width} of "
                                f"{stage.blocks_path}.{index}.{name}; use a divisor of it or -1"
                            )
    if count == 0:
        raise EpmqError(f"model {type(model).__name__} has no linear layers to quantize")
    return count


def grouped_linears(block: nn.Module, groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """The block's ``nn.Linear`` names arranged in ``groups`` (names the block lacks dropped);
    linears that no group names follow, one per group, in definition order."""
    present = [name for name, mod in block.named_modules() if isinstance(mod, nn.Linear)]
    arranged = [[n for n in group if n in present] for group in groups]
    arranged = [g for g in arranged if g]
    listed = {n for g in arranged for n in g}
    return arranged + [[n] for n in present if n not in listed]


_REGISTRY: list[type[BlockAdapter]] = []


def register_adapter(cls: type[BlockAdapter]) -> type[BlockAdapter]:
    """Class decorator: make ``cls`` (a family) known to :mod:`epmq.models.registry`.

    A family name and a ``model_type`` belong to one adapter; a clash is a bug (``ValueError``).
    """
    if cls in _REGISTRY:
        return cls
    if not cls.family or not cls.model_types:
        raise ValueError(f"{cls.__name__} must declare 'family' and 'model_types'")
    for other in _REGISTRY:
        if other.family == cls.family:
            raise ValueError(f"family {cls.family!r} is declared by {other.__name__} already")
        shared = set(other.model_types) & set(cls.model_types)
        if shared:
            raise ValueError(
                f"model types {sorted(shared)} of {cls.__name__} belong to {other.__name__}"
            )
    _REGISTRY.append(cls)
    return cls


def registered_adapters() -> list[type[BlockAdapter]]:
    """Adapters registered so far (import the family modules first)."""
    return list(_REGISTRY)
