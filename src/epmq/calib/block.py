"""One block's lifecycle: calibrate (statistics) → solve (linears) → propagate (next inputs).

``BlockJob`` holds what a block needs: the block, its per-task input calls, the second
activation stream (the experts' for ``x_source="expert"``, the full-precision merge's for a
solver with ``target_stream="merge"``), and the targets' tensors of this block only (read from
each expert's files, or snapshot from the merged block, when the block starts, dropped when it
ends: calib/targets.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from epmq.calib.distributed import GramReducer, placeholder
from epmq.calib.expert_weights import ExpertWeights
from epmq.calib.fold import fold_input_scale, search_input_scales
from epmq.calib.norms import BlockNorms, norm_slots, norm_tensors
from epmq.calib.problem import layer_problem
from epmq.calib.propagate import Streams, propagate, propagate_calls, served
from epmq.calib.records import LayerRecord
from epmq.calib.reuse import FinalOutputs
from epmq.calib.solve import SolveOptions, solve_layer
from epmq.calib.statistics import FoldedStatistics, LinearInputs, TaskStatistics
from epmq.calib.stats_cache import StatsCache
from epmq.calib.targets import block_targets
from epmq.devices import release_freed_memory
from epmq.models.adapter import BlockAdapter, Stage
from epmq.quant import QuantResult


@dataclass
class BlockOutcome:
    """Solved weights (by module name), quantization results and records of one block."""

    weights: dict[str, Tensor] = field(default_factory=dict)
    results: dict[str, QuantResult] = field(default_factory=dict)
    records: list[LayerRecord] = field(default_factory=list)
    grams: dict[str, list[Tensor]] = field(default_factory=dict)


@dataclass
class BlockJob:
    """A block and everything needed to solve it."""

    adapter: BlockAdapter
    stage: Stage
    index: int
    block: nn.Module
    tasks: list[str]
    experts: list[ExpertWeights] | None
    options: SolveOptions
    x_source: str
    true_sequential: bool
    keep_grams: bool = False
    reducer: GramReducer | None = None
    stats_cache: StatsCache | None = None
    #: keep finished sub-modules' outputs for the block's later passes (calib/reuse.py); off
    #: when activations are offloaded to disk (the copies would sit in memory)
    reuse_outputs: bool = True

    @property
    def prefix(self) -> str:
        """Module-name prefix of this block in the model."""
        return f"{self.stage.blocks_path}.{self.index}"

    # -- the lifecycle ------------------------------------------------------------------------
    @torch.no_grad()
    def run(
        self, calls: Streams | None, expert_calls: Streams | None
    ) -> tuple[BlockOutcome, Streams | None, Streams | None]:
        """Solve the block; return the outcome and the next block's calls (and expert stream).

        Without ``calls`` nothing runs through the block: RTN rounds each weight alone (no
        proxy loss), and with a filled ``stats_cache`` (``x_source="merged"``) every linear is
        solved from the cached statistics of the merged stream.
        """
        stream = self.options.solver.second_stream(self.x_source) and calls is not None
        states, twins = block_targets(
            self.block, self.prefix, self.experts, self.tasks, self.options.solver, stream=stream
        )
        groups = self.adapter.linear_groups(self.block)
        outcome = BlockOutcome()
        if calls is None:
            cache = self.stats_cache
            stats = None if cache is None else cache.load(self.stage.name, self.index, self.block)
            self._solve([n for g in groups for n in g], stats, states, outcome)
            return outcome, None, None
        norms = self._norms()
        sites = self.adapter.norms(self.block) if norms is not None else []
        if self.x_source == "merged":
            names = [n for g in groups for n in g]
            if norms is not None:  # before the one pass: the merged stream sees them
                norms.fit([n for n, _ in sites], calls, None, None, outcome.weights)
            stats, merged_next = self._calibrate(
                names, calls, None, None, propagate=True, states=states
            )
            assert merged_next is not None
            next_calls = merged_next
            if self.stats_cache is not None:
                self.stats_cache.store(self.stage.name, self.index, stats)
            self._solve(names, stats, states, outcome)
        else:
            # A solver that ignores its inputs (RTN) needs one pass, for the proxy losses.
            sequential = self.true_sequential and self.options.solver.uses_inputs
            plan = groups if sequential else [[n for g in groups for n in g]]
            keep = sequential and self.reuse_outputs
            reuse = FinalOutputs(self.block) if keep else None  # exact: calib/reuse.py
            slots = norm_slots(sites, plan)  # norms fitted before group k (calib/norms.py)
            for k, group in enumerate(plan):
                if norms is not None:
                    norms.fit(slots[k], calls, twins, expert_calls, outcome.weights, reuse)
                stats, _ = self._calibrate(
                    group, calls, twins, expert_calls, propagate=False, states=states, reuse=reuse
                )
                self._solve(group, stats, states, outcome, reuse)
                del stats  # not alive while the next group's are gathered
                release_freed_memory()
                if reuse is not None:
                    reuse.mark_solved(group)
            if norms is not None:
                norms.fit(slots[-1], calls, twins, expert_calls, outcome.weights, reuse)
            next_calls = propagate(
                self.adapter, self.stage, self.index, self.block, calls, reuse=reuse
            )
        return outcome, next_calls, self._advance_experts(twins, expert_calls)

    @torch.no_grad()
    def replay(
        self, calls: Streams | None, expert_calls: Streams | None, weights: dict[str, Tensor]
    ) -> tuple[Streams | None, Streams | None]:
        """Propagate through a block finished by an earlier run, loading its solved weights.

        The inputs are propagated exactly as the original run did: through the full-precision
        block for ``x_source="merged"`` (then the weights are loaded), else through the solved
        block. Without ``calls`` (a run without data) the weights are only loaded.
        """
        if calls is None:
            self.load(weights)
            return None, None
        twins = None
        if self.options.solver.second_stream(self.x_source):
            _, twins = block_targets(
                self.block, self.prefix, self.experts, self.tasks, self.options.solver, stream=True
            )
        if self.x_source == "merged":
            sites = self.adapter.norms(self.block)  # fitted before the merged stream ran
            self.load(norm_tensors(weights, self.prefix, sites))
            next_calls = propagate(self.adapter, self.stage, self.index, self.block, calls)
            self.load(weights)
        else:
            self.load(weights)
            next_calls = propagate(self.adapter, self.stage, self.index, self.block, calls)
        return next_calls, self._advance_experts(twins, expert_calls)

    def load(self, weights: dict[str, Tensor]) -> None:
        """Write solved weights (keyed by module name) into the block."""
        for full, weight in weights.items():
            name = full[len(self.prefix) + 1 :]
            if name.endswith(".bias"):  # a bias an input scale was folded into (calib/fold.py)
                param = self.block.get_parameter(name)
            else:
                param = self.block.get_submodule(name).weight
            param.data.copy_(weight.to(param.dtype))

    def _norms(self) -> BlockNorms | None:
        """The block's norm fitter when the solver refits norms (calib/norms.py)."""
        if not self.options.solver.fits_norms(self.options.params):
            return None
        assert self.experts is not None  # the engine requires them
        return BlockNorms(
            self.block, self.prefix, self.tasks, self.experts, self.options.task_weights,
            distributed=self.reducer is not None,
        )  # fmt: skip

    def _advance_experts(
        self, twins: list[nn.Module] | None, expert_calls: Streams | None
    ) -> Streams | None:
        if twins is None or expert_calls is None:
            return None
        for task, twin in zip(self.tasks, twins, strict=True):  # in place, task by task
            task_calls = expert_calls[task]
            expert_calls[task] = propagate_calls(
                self.adapter, self.stage, self.index, twin, task_calls
            )
            del task_calls
        return expert_calls

    def _calibrate(
        self,
        names: list[str],
        calls: Streams,
        twins: list[nn.Module] | None,
        expert_calls: Streams | None,
        *,
        propagate: bool,
        states: list[dict[str, Tensor]] | None = None,
        reuse: FinalOutputs | None = None,
    ) -> tuple[TaskStatistics, Streams | None]:
        solver = self.options.solver
        regmean_expert = solver.gram_inputs == "expert" and twins is not None
        cross = twins is not None and not regmean_expert and solver.cross_terms(self.options.params)
        fold = self._fold_weights(names, states)
        # the mean inputs, for bias correction (a statistics cache keeps them for any solver)
        cached = self.x_source == "merged" and self.stats_cache is not None
        means = solver.fits_bias(self.options.params) or cached
        stats: TaskStatistics
        if fold is None:
            stats = TaskStatistics(self.block, names, self.tasks, cross=cross, means=means)
        else:
            stats = FoldedStatistics(
                self.block, names, self.tasks, cross=cross, fold=fold,
                task_weights=self.options.task_weights,
                reduce=self.reducer.reduce_ if self.reducer is not None else None, means=means,
            )  # fmt: skip
        with reuse.pass_() if reuse is not None else contextlib.nullcontext():
            self._record_tasks(
                names, calls, twins, expert_calls, stats, propagate, regmean_expert, reuse
            )
        if self.reducer is not None:
            self.reducer.reduce_(stats)
        return stats, calls if propagate else None

    def _fold_weights(
        self, names: list[str], states: list[dict[str, Tensor]] | None
    ) -> dict[str, list[Tensor] | None] | None:
        """Per linear, what its tasks' statistics are folded with while calibrating (see
        :class:`FoldedStatistics`): the experts' weights (E-PMQ), W_m repeated (merged
        targets) or nothing (S only: GPTQ, RTN), as the solver declares. None keeps every
        per-task Gram instead: ``grams`` solvers (RegMean), ``keep_grams`` and a statistics
        cache need them."""
        cached = self.x_source == "merged" and self.stats_cache is not None
        if self.options.solver.statistics == "grams" or self.keep_grams or cached:
            return None
        fold: dict[str, list[Tensor] | None] = {}
        for name in names:
            experts = None if states is None else [s[f"{name}.weight"] for s in states]
            merged = self.block.get_submodule(name).weight.detach().float()
            fold[name] = self.options.target_weights(experts, merged)
        return fold

    def _record_tasks(
        self,
        names: list[str],
        calls: Streams,
        twins: list[nn.Module] | None,
        expert_calls: Streams | None,
        stats: TaskStatistics,
        propagate: bool,
        regmean_expert: bool,
        reuse: FinalOutputs | None,
    ) -> None:
        """Run every task's calls through the block, adding the recorded inputs to ``stats``;
        with ``propagate`` each call is replaced in ``calls`` by the next block's, as it goes
        (calib/propagate.py)."""
        for t, task in enumerate(self.tasks):
            recorder = LinearInputs(self.block, names, stop=not propagate)
            expert_recorder = (
                LinearInputs(twins[t], names, stop=True) if twins is not None else None
            )
            task_calls = calls[task]
            task_expert_calls = None if expert_calls is None else expert_calls[task]
            for b, call in enumerate(task_calls):
                with recorder, served(reuse, self.adapter, task, b, call):
                    recorder.reset(call.mask, call.linear_masks)
                    out = call.run(self.block)
                expert_inputs = None
                if expert_recorder is not None and task_expert_calls is not None:
                    expert_call = task_expert_calls[b]
                    with expert_recorder:
                        expert_recorder.reset(expert_call.mask, expert_call.linear_masks)
                        expert_call.run(expert_recorder.block)
                    expert_inputs = expert_recorder.inputs
                if regmean_expert:
                    assert expert_inputs is not None
                    stats.add(task, expert_inputs, None)
                else:
                    stats.add(task, recorder.inputs, expert_inputs)
                if propagate:
                    task_calls[b] = call.advanced(self.adapter, self.stage, self.index, out)
                del call, out
            stats.end_task(task)
            if propagate:
                calls[task] = task_calls
            del task_calls, task_expert_calls

    def _solve(
        self,
        names: list[str],
        stats: TaskStatistics | None,
        states: list[dict[str, Tensor]] | None,
        outcome: BlockOutcome,
        reuse: FinalOutputs | None = None,
    ) -> None:
        """Solve ``names`` and write them into the block. Over several ranks the linears are
        shared out (weight-parallel: each rank solves its own, then every solution is
        broadcast from the rank that owns it, :class:`GramReducer`). A solver's input scales
        are searched on every rank and folded into their producers (calib/fold.py)."""
        reducer = self.reducer
        owners = {name: 0 if reducer is None else reducer.owner(name) for name in names}
        mine = [n for n in names if reducer is None or owners[n] == reducer.rank]
        fits = stats is not None and self.options.solver.fits_bias(self.options.params)
        problem_of = (
            None
            if stats is None
            else (lambda n: layer_problem(self.block, self.prefix, n, stats, states, self.options))
        )
        folds, scale_of = search_input_scales(
            self.block, self.adapter.input_producers, names, problem_of, self.options
        )
        solved = {
            name: solve_layer(
                layer_problem(
                    self.block, self.prefix, name, stats, states, self.options, scale_of.get(name)
                ),
                self.options,
            )
            for name in mine
        }
        for name in names:
            module = self.block.get_submodule(name)
            full = f"{self.prefix}.{name}"
            solution = solved.get(name)
            if reducer is not None:
                if solution is None:
                    solution = placeholder(
                        module.weight, self.options.grid, module.bias if fits else None
                    )
                reducer.share_(solution, full, src=owners[name])
            module.weight.data.copy_(solution.weight.to(module.weight.dtype))
            outcome.weights[full] = module.weight.detach().clone()
            if solution.bias is not None:  # bias correction (replayed by load)
                module.bias.data.copy_(solution.bias.to(module.bias))
                outcome.weights[f"{full}.bias"] = module.bias.detach().clone()
            result = solution.result
            if result is not None:
                result.share_with(module.weight.data)
                outcome.results[full] = result
            if self.keep_grams and stats is not None:
                outcome.grams[f"{full}.weight"] = stats.grams(name)
            record = LayerRecord(
                name=full,
                stage=self.stage.name,
                block=self.index,
                method=self.options.method,
                shape=(int(module.out_features), int(module.in_features)),
                tokens={} if stats is None else stats.counts(name),
                proxy_loss=solution.proxy_loss,
                damping=solution.damping,
                damping_retries=solution.damping_retries,
                seconds=solution.seconds,
            )
            record.log()
            outcome.records.append(record)
        for producer, s in folds.items():
            fold_input_scale(self.block, self.prefix, producer, s, outcome.weights, outcome.results)
            if reuse is not None:
                reuse.forget(producer)
