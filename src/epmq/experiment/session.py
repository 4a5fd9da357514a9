"""One experiment from start to report: workload, runner, outputs, in that order.

Shared by ``epmq run CONFIG.yaml`` and ``epmq demo``: checks the output folder before any
work (no overwrite without ``force``), builds the workload, runs every variant, and writes the
report folder atomically (a run killed half-way leaves no folder that looks complete).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from epmq.atomic import (
    output_dir,
    partial_dir,
    refuse_existing,
    refuse_overlap,
    refuse_stopped_run,
    write_text,
)
from epmq.eval.results import Results
from epmq.experiment.config import ExperimentConfig
from epmq.experiment.exports import VariantExporter
from epmq.experiment.journal import JOURNAL_FILE, Journal
from epmq.experiment.runner import run_experiment
from epmq.experiment.workload import Workload, suite_workload
from epmq.identity import input_identities


def build_workload(
    config: ExperimentConfig,
    *,
    quick: bool = False,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Workload:
    """The workload a config names: a built-in suite, or the user's folders."""
    if config.suite is None:
        from epmq.experiment.folders import folder_workload

        return folder_workload(config)
    return suite_workload(
        config.suite,
        quick=quick,
        cache_dir=cache_dir,
        calib_examples=config.calibration.examples,
        eval_batch_size=config.evaluation.batch_size,
        max_test=config.evaluation.max_test,
        progress=progress,
    )


def session_inputs(config: ExperimentConfig, cache_dir: Path | None) -> list[tuple[str, Path]]:
    """What a run reads: the config's files and folders, or the built-in suite's cache."""
    if config.suite is None:
        return config.inputs()
    from epmq.suites.suite import default_cache_root

    return [*config.inputs(), ("suite cache", cache_dir or default_cache_root())]


def input_fingerprint(config: ExperimentConfig, workload: Workload) -> dict[str, Any]:
    """The identities (:mod:`epmq.identity`) of what the run's results depend on, for the
    journal's fingerprint: the config's base, experts, heads and task data (the config file
    itself enters through its settings), or a built-in suite's prepared base and experts (the
    suite's settings, in the fingerprint too, fix its data)."""
    if config.suite is None:
        inputs = [(label, path) for label, path in config.inputs() if label != "config file"]
    else:
        inputs = [("suite base", workload.base_dir)]
        inputs += [(f"suite expert {t}", folder) for t, folder in workload.expert_dirs.items()]
    return input_identities(inputs)


def check_models(config: ExperimentConfig) -> None:
    """What ``epmq run --check`` reads beyond the config: every group size must divide every
    linear of the base (a user's base folder; the built-in suites' models fit their grids)."""
    if config.base is None:
        return
    from epmq.models.adapter import check_group_sizes
    from epmq.models.registry import load_model

    model, adapter = load_model(config.base.path)
    sizes = config.quantization.group_sizes
    check_group_sizes(model, adapter, sizes, config.where("quantization.group_sizes"))


def run_session(
    config: ExperimentConfig,
    *,
    quick: bool = False,
    cache_dir: Path | None = None,
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
    announce: Callable[[str], None] = print,
) -> tuple[Results, Path]:
    """Run ``config`` end to end and write its report; returns the results and the folder.

    The run is journalled (:mod:`epmq.experiment.journal`) in a partial folder that survives
    an error or an interrupt; ``resume=True`` continues such a stopped run from its last
    finished model when its settings and inputs (:func:`input_fingerprint`) are unchanged,
    ``force`` discards it. Under ``torchrun`` every rank runs it with its share of the
    calibration data and rank 0 writes everything (:mod:`epmq.experiment.ranks`).
    """
    from epmq.calib.distributed import launched_group
    from epmq.devices import resolve_device

    with launched_group(resolve_device(config.device)) as (rank, world):
        if rank != 0:
            return _run_other_rank(config, rank, world, quick=quick, cache_dir=cache_dir)
        return _run_rank0(
            config, world, quick=quick, cache_dir=cache_dir, force=force, resume=resume,
            progress=progress, announce=announce,
        )  # fmt: skip


def _run_rank0(
    config: ExperimentConfig,
    world: int,
    *,
    quick: bool,
    cache_dir: Path | None,
    force: bool,
    resume: bool,
    progress: bool,
    announce: Callable[[str], None],
) -> tuple[Results, Path]:
    """The whole run in one process, or rank 0's part of it under ``torchrun``."""
    from epmq.experiment.ranks import barrier, rank_workload, share_journal

    out = Path(config.output.dir)
    force = force or config.output.force
    refuse_overlap(out, session_inputs(config, cache_dir))
    refuse_existing(out, force)
    refuse_stopped_run(out, resume=resume, force=force)  # before any work
    resuming = resume and (partial_dir(out) / JOURNAL_FILE).is_file()
    started = time.perf_counter()
    announce(f"epmq: preparing workload {config.suite or config.name!r}")
    workload = build_workload(config, quick=quick, cache_dir=cache_dir, progress=progress)
    barrier(world)  # the other ranks load the workload rank 0 prepared
    if world > 1:
        workload = rank_workload(workload, 0, world)
        announce(f"epmq: calibrating on {world} ranks")
    announce(f"epmq: {len(workload.tasks)} tasks: {', '.join(workload.tasks)}")
    from epmq.eval.report import render_markdown, write_report

    # The whole run builds its folder under a hidden partial name: exports land there as the
    # variants are built, the report at the end, and only a finished run takes the name.
    fingerprint = {
        "config": config.model_dump(mode="json", exclude={"output": {"force"}}),
        "workload": workload.settings,
        "tasks": workload.tasks,
        "inputs": input_fingerprint(config, workload),
    }
    # --resume reuses the partial folder even without a journal (a run stopped before its
    # first model): the journal then starts afresh and every export is rewritten.
    with output_dir(out, force=force, resumable=True, resume=resume) as partial:
        journal = Journal(partial, fingerprint, resume=resuming)
        if world > 1:
            share_journal(journal, 0)
        if journal.done:
            announce(f"epmq: resuming {partial}: {journal.done} models already finished")
        exporter = VariantExporter(config, workload, partial / "exports", journal)
        try:
            results = run_experiment(
                config,
                workload,
                progress=False,
                announce=announce,
                on_model=exporter if config.output.export else None,
                journal=journal,
            )
        except BaseException:
            announce(
                f"epmq: run stopped after {journal.done} finished models; the same command "
                "with --resume continues it"
            )
            raise
        results.timings["total"] = time.perf_counter() - started
        if exporter.written:
            results.settings["exports"] = exporter.written
        write_report(results, partial, force=True)
        write_text(partial / "config.yaml", _config_yaml(config))
        journal.path.unlink()  # last: a run stopped while writing the report resumes from it
    announce("")
    announce(render_markdown(results).split("\n## ")[0])
    announce(f"epmq: report written to {out}")
    return results, out


def _run_other_rank(
    config: ExperimentConfig, rank: int, world: int, *, quick: bool, cache_dir: Path | None
) -> tuple[Results, Path]:
    """Rank ``rank`` (not 0) under ``torchrun``: the same models as rank 0, on its share of
    the calibration data; it evaluates and writes nothing."""
    from epmq.experiment.ranks import barrier, rank_workload, share_journal

    barrier(world)  # after rank 0 prepared the workload (a suite may train its experts)
    workload = build_workload(config, quick=quick, cache_dir=cache_dir, progress=False)
    workload = rank_workload(workload, rank, world)
    journal = share_journal(None, rank)
    results = run_experiment(config, workload, announce=lambda _: None, journal=journal)
    return results, Path(config.output.dir)


def _config_yaml(config: ExperimentConfig) -> str:
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
