"""Distributed E-PMQ / GPTQ calibration on CPU over ``torch.distributed`` (gloo).

    torchrun --nproc_per_node 2 examples/distributed_calibration.py
    python examples/distributed_calibration.py            # the same, in one process

Every rank builds the same small BERT (from a config, seeded), the same K experts (the base
plus random task vectors) and their average as the merged model; every rank then takes its
own shard of each task's calibration batches (rank r: batches r, r + R, ...). Inside
``quantize_model`` the per-task Gram sums and token counts are all-reduced before each
solve, the solves are shared out among the ranks and broadcast, and each rank propagates its own shard
(:mod:`epmq.calib.distributed`). At the end the ranks compare a digest of their weights: they
hold the same quantized model, equal to one process calibrated on all the batches up to float
summation order.
"""

from __future__ import annotations

import copy
import hashlib
import os

import torch
import torch.distributed as dist
from transformers import BertConfig, BertModel

from epmq.calib import EngineOptions, quantize_model
from epmq.models.bert import BertAdapter
from epmq.quant import QuantGrid

METHOD = "epmq"  # or "gptq"
TASKS = ("sports", "finance", "science")
BATCHES_PER_TASK = 8
BATCH, SEQ, VOCAB = 8, 32, 3000


def build(seed: int = 0) -> tuple[BertModel, list[dict[str, torch.Tensor]]]:
    """The merged model (average of the experts) and the experts' state dicts."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=SEQ,
    )  # fmt: skip
    base = BertModel(config, add_pooling_layer=False).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    experts = []
    for _ in TASKS:
        state = {}
        for name, value in base.state_dict().items():
            if name.startswith("encoder.") and value.is_floating_point():
                value = value + 0.05 * value.std() * torch.randn(value.shape, generator=gen)
            state[name] = value.clone()
        experts.append(state)
    merged = copy.deepcopy(base)
    merged.load_state_dict({k: torch.stack([e[k] for e in experts]).mean(0) for k in experts[0]})
    return merged.eval(), experts


def calibration(seed: int = 2) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Per task: token ids from the task's own slice of the vocabulary, some padding."""
    gen = torch.Generator().manual_seed(seed)
    span = VOCAB // len(TASKS)
    calib = {}
    for t, task in enumerate(TASKS):
        batches = []
        for _ in range(BATCHES_PER_TASK):
            ids = torch.randint(t * span, (t + 1) * span, (BATCH, SEQ), generator=gen)
            mask = torch.ones_like(ids)
            mask[: BATCH // 2, SEQ - 8 :] = 0
            batches.append({"input_ids": ids, "attention_mask": mask})
        calib[task] = batches
    return calib


def digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes (equal digests: bit-identical models)."""
    h = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(param.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    torch.set_num_threads(1)
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    merged, experts = build()
    shard = {task: batches[rank::world] for task, batches in calibration().items()}
    run = quantize_model(
        merged,
        BertAdapter(),
        shard,
        method=METHOD,
        grid=QuantGrid(4, group_size=32),
        experts=experts if METHOD == "epmq" else None,
        engine=EngineOptions(progress=rank == 0),
    )
    digests = [digest(merged)]
    if world > 1:
        digests = [""] * world
        dist.all_gather_object(digests, digest(merged))
    if rank == 0:
        print(f"{METHOD}, {world} rank(s), {len(run.layers)} linears in {run.seconds:.1f}s")
        for record in run.layers[:6]:
            tokens = sum(record.tokens.values())
            print(f"  {record.name:45s} tokens {tokens:5d}  proxy loss {record.proxy_loss:.4g}")
        agree = len(set(digests)) == 1
        print(f"weights digest {digests[0]}; all ranks agree: {agree}")
        if not agree:
            raise SystemExit(f"ranks disagree: {digests}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
