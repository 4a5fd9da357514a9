"""Figures for the built-in text8 suite: data sizes, expert vs probe accuracy, timings.

    python benchmarks/bench_text8_suite.py [--quick] [--cache-dir DIR] [--threads N] [--tasks A,B]

Trains the experts and probes on first run (cached afterwards; the training time per expert is
read from each expert's ``epmq_expert.json``), then prints per task: train / calib / test
sizes, class count, expert and probe test accuracy, expert training time, and the evaluation
throughput (examples per second) of ``evaluate_accuracy`` on the pretrained encoder: the first
call (tokenizing the test splits) and a second one (reusing the cached padded batches, as every
later model of an experiment does).
CPU timings depend on the load of the machine; report them with the load average printed.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from epmq.eval.accuracy import evaluate_accuracy
from epmq.suites import get_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="text8")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of the tasks")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, load average: {os.getloadavg()}")

    overrides = {"tasks": args.tasks} if args.tasks else {}
    suite = get_suite(args.suite, cache_dir=args.cache_dir, quick=args.quick, **overrides)
    start = time.perf_counter()
    tasks = suite.tasks
    print(f"suite {suite.name}, cache {suite.cache_path}")
    print(f"tasks built in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    models = suite.prepare(progress=True)
    print(f"prepare: {time.perf_counter() - start:.1f} s (0 when cached)")
    print(f"load average after prepare: {os.getloadavg()}")

    base = suite.load_encoder()
    timed = []
    for _ in range(2):  # the first call tokenizes, the second reuses the batches
        start = time.perf_counter()
        probe_acc = evaluate_accuracy(
            base, models.probe_heads, tasks, tokenizer=suite.tokenizer, batch_size=args.batch_size
        )
        timed.append(time.perf_counter() - start)
    n_test = sum(len(t.test.texts) for t in tasks)

    expert_acc = {}
    for task in tasks:
        encoder = suite.load_encoder(models.expert_dirs[task.name])
        head = suite.load_head(models.expert_dirs[task.name])
        expert_acc.update(
            evaluate_accuracy(
                encoder,
                {task.name: head},
                [task],
                tokenizer=suite.tokenizer,
                batch_size=args.batch_size,
            )
        )

    header = (
        f"{'task':18} {'train':>6} {'calib':>6} {'test':>5} {'cls':>4} "
        f"{'expert':>7} {'probe':>7} {'train_s':>8} {'loss':>12}"
    )
    print(header)
    print("-" * len(header))
    for task in tasks:
        record = models.records.get(task.name, {})
        loss = f"{record.get('first_loss', 0):.2f}->{record.get('final_loss', 0):.2f}"
        print(
            f"{task.name:18} {len(task.train.texts):6d} {len(task.calib.texts):6d} "
            f"{len(task.test.texts):5d} {task.num_classes:4d} {expert_acc[task.name]:7.3f} "
            f"{probe_acc[task.name]:7.3f} {record.get('train_seconds', float('nan')):8.1f} "
            f"{loss:>12}"
        )
    mean_e = sum(expert_acc.values()) / len(expert_acc)
    mean_p = sum(probe_acc.values()) / len(probe_acc)
    total_train = sum(r.get("train_seconds", 0.0) for r in models.records.values())
    print(f"{'mean':18} {'':6} {'':6} {'':5} {'':4} {mean_e:7.3f} {mean_p:7.3f} {total_train:8.1f}")
    for label, seconds in zip(("first (tokenizes)", "again (cached batches)"), timed, strict=True):
        print(
            f"evaluation {label}: {n_test} test examples over {len(tasks)} tasks in "
            f"{seconds:.1f} s = {n_test / seconds:.0f} examples/s (batch {args.batch_size}, "
            f"{torch.get_num_threads()} threads); load average {os.getloadavg()}"
        )


if __name__ == "__main__":
    main()
