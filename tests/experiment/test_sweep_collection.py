"""Table rows that are also α-sweep points join the sweep only for the studied (first) merge."""

from epmq.eval.results import Results, Row
from epmq.experiment.config import parse_config
from epmq.experiment.plan import collect_sweep_from_rows


def test_only_the_first_merges_rows_join_the_sweep() -> None:
    config = parse_config(
        {
            "suite": "tiny",
            "merges": [{"method": "task_arithmetic"}, {"method": "ties"}],
            "quantization": {"bits": [4, 3], "alpha": 0.1, "alpha_sweep": [0.0, 0.1]},
        }
    )
    results = Results.new("tiny", ["a"], {}, 0)
    for merge, acc in (("task_arithmetic", 0.6), ("ties", 0.7)):
        for bits in (4, 3):
            results.add(
                Row(
                    name=f"{merge} epmq w{bits}", kind="quantized", merge=merge,
                    quantizer="epmq", bits=bits, x_source="quantized",
                    params={"alpha": 0.1, "target": "expert"}, accuracy={"a": acc},
                )
            )  # fmt: skip
    collect_sweep_from_rows(results, config)
    points = results.sweeps["alpha"]
    assert [(p.merge, p.bits, p.params["alpha"], p.average) for p in points] == [
        ("task_arithmetic", 3, 0.1, 0.6)
    ]
