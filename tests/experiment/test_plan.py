from epmq.experiment.config import parse_config
from epmq.experiment.plan import SWEEP, plan_experiment


def _config(**quant: object) -> object:
    return parse_config(
        {
            "suite": "tiny",
            "merges": [{"method": "task_arithmetic"}, {"method": "ties"}],
            "quantization": quant,
        }
    )


def test_plan_crosses_merges_quantizers_bits_and_groups() -> None:
    plan = plan_experiment(
        _config(methods=["rtn", "gptq", "epmq"], bits=[4, 3], group_sizes=[-1, 8])
    )
    for merge in ("task_arithmetic", "ties"):
        rows = [v for v in plan if v.merge == merge]
        assert [v.kind for v in rows].count("merged") == 1
        assert [v.kind for v in rows].count("target") == 1
        quantized = [v for v in rows if v.kind == "quantized"]
        assert len(quantized) == 3 * 2 * 2
        assert {(v.quantizer, v.bits, v.group_size) for v in quantized} == {
            (q, b, g) for q in ("rtn", "gptq", "epmq") for b in (4, 3) for g in (-1, 8)
        }
    assert len({v.name for v in plan}) == len(plan)


def test_sweep_and_study_run_on_the_first_merge_at_the_lowest_bits() -> None:
    plan = plan_experiment(
        _config(bits=[4, 3], alpha=0.1, alpha_sweep=[0.0, 0.1, 10.0], x_source_study=True)
    )
    sweep = [v for v in plan if v.sweep == SWEEP]
    assert {v.merge for v in sweep} == {"task_arithmetic"}
    assert {v.bits for v in sweep} == {3}
    # α = 0.1 with expert targets is already a table row: it is planned once, not twice.
    assert {tuple(v.overrides) for v in sweep} == {
        (("alpha", 0.0), ("target", "expert")),
        (("alpha", 0.0), ("target", "merged")),
        (("alpha", 0.1), ("target", "merged")),
        (("alpha", 10.0), ("target", "expert")),
        (("alpha", 10.0), ("target", "merged")),
    }
    study = [v for v in plan if v.study == "x_source"]
    assert {v.quantizer for v in study} == {"epmq"}
    assert {v.x_source for v in study} == {"merged", "quantized"}  # E-PMQ's default: expert
    assert {v.merge for v in study} == {"task_arithmetic"}


def test_no_epmq_means_no_target_and_no_sweep() -> None:
    plan = plan_experiment(_config(methods=["gptq"], alpha_sweep=[0.0, 1.0], x_source_study=True))
    assert all(v.quantizer in (None, "gptq") for v in plan)
    assert not any(v.kind == "target" or v.sweep for v in plan)
