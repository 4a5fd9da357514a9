"""Norm correction (``norm_correction=true``): the closed form, the fit, resume, the default.

Tolerances: the closed form and ``torch.linalg.lstsq`` both run in float64 on well-conditioned
channels (1e-9 relative); the fitted parameters are written in float32, so the error they reach
on the fit's own data is compared with 1e-6 relative slack per norm.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from calib_fixtures import make_base, make_calib
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import epmq.calib.norms as norms_module
from epmq.calib import EngineOptions, quantize_model
from epmq.calib.norms import NormSums, norm_slots, raw_sums
from epmq.errors import EpmqError
from epmq.models.bert import BertAdapter
from epmq.models.llama import LlamaAdapter
from epmq.quant import QuantGrid

GRID = QuantGrid(4, 16)
WEIGHTS = (1.0, 2.0, 0.5)


# -- (1) the closed form ----------------------------------------------------------------------
def _tasks(channels: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for n in (7, 12, 5):
        x = torch.randn(n, channels, generator=gen, dtype=torch.float64)
        y = 0.7 * x + 0.3 + 0.2 * torch.randn(n, channels, generator=gen, dtype=torch.float64)
        out.append((x, y))
    return out


def _lstsq(tasks, intercept: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per channel: rows scaled by sqrt(w_i / n_i), solved by ``torch.linalg.lstsq``."""
    channels = tasks[0][0].shape[1]
    gammas, betas = [], []
    for c in range(channels):
        rows, rhs = [], []
        for (x, y), w in zip(tasks, WEIGHTS, strict=True):
            scale = (w / x.shape[0]) ** 0.5
            cols = [x[:, c]] + ([torch.ones_like(x[:, c])] if intercept else [])
            rows.append(scale * torch.stack(cols, 1))
            rhs.append(scale * y[:, c : c + 1])
        sol = torch.linalg.lstsq(torch.cat(rows), torch.cat(rhs)).solution[:, 0]
        gammas.append(sol[0])
        betas.append(sol[1] if intercept else None)
    return torch.stack(gammas), torch.stack(betas) if intercept else None


@pytest.mark.parametrize("layer_norm", [True, False], ids=["layernorm", "rmsnorm"])
def test_closed_form_equals_brute_force_least_squares(layer_norm: bool) -> None:
    tasks = _tasks(6)
    sums = NormSums(6)
    for (x, y), w in zip(tasks, WEIGHTS, strict=True):
        sums.add_task(raw_sums(x, y), w)
    gamma0 = torch.ones(6)
    beta0 = torch.zeros(6) if layer_norm else None
    gamma, beta = sums.fit(gamma0, beta0)
    want_gamma, want_beta = _lstsq(tasks, intercept=layer_norm)
    assert torch.allclose(gamma, want_gamma, rtol=1e-9, atol=1e-12)
    if layer_norm:
        assert beta is not None and want_beta is not None
        assert torch.allclose(beta, want_beta, rtol=1e-9, atol=1e-12)
    else:
        assert beta is None
    assert not torch.allclose(gamma, gamma0.double())  # it moved

    # the reported objective is the brute-force one, and the fit is its minimum
    def objective(g: torch.Tensor, b: torch.Tensor | None) -> float:
        total = 0.0
        for (x, y), w in zip(tasks, WEIGHTS, strict=True):
            pred = g * x + (0 if b is None else b)
            total += w * float(((pred - y) ** 2).sum()) / x.shape[0]
        return total

    assert sums.error(gamma, beta) == pytest.approx(objective(gamma, beta), rel=1e-9)
    assert sums.error(gamma, beta) < sums.error(gamma0, beta0)


def test_constant_channel_keeps_its_gamma() -> None:
    """A channel whose x̂ never varies has no slope to fit: γ stays, β absorbs the offset."""
    x = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[:, 1] = 2.0
    y = 0.5 * x + 1.0
    sums = NormSums(3)
    sums.add_task(raw_sums(x, y), 1.0)
    gamma, beta = sums.fit(torch.full((3,), 3.0), torch.zeros(3))
    assert beta is not None
    assert float(gamma[1]) == 3.0 and float(beta[1]) == pytest.approx(2.0 - 6.0)
    assert torch.allclose(gamma[[0, 2]], torch.full((2,), 0.5, dtype=torch.float64))


def test_norms_are_fitted_between_their_producer_and_their_readers() -> None:
    plan = [["q", "k", "v"], ["o"], ["up"], ["down"]]
    sites = [("ln1", None), ("ln2", "o"), ("ln_out", "down")]
    assert norm_slots(sites, plan) == [["ln1"], [], ["ln2"], [], ["ln_out"]]
    assert norm_slots(sites, plan, upfront=True) == [["ln1", "ln2", "ln_out"], [], [], [], []]
    block = make_base().encoder.layer[0]
    assert BertAdapter().norms(block) == [
        ("attention.output.LayerNorm", "attention.output.dense"),
        ("output.LayerNorm", "output.dense"),
    ]


# -- the tiny families, with experts whose norms differ ----------------------------------------
def _experts(base: nn.Module, marker: str, k: int = 3) -> list[dict[str, torch.Tensor]]:
    """Base + noise on every block tensor; norms' γ and β get their own (their std is 0)."""
    gen = torch.Generator().manual_seed(11)
    experts = []
    for _ in range(k):
        state = {}
        for name, value in base.state_dict().items():
            value = value.clone()
            if marker in name and value.is_floating_point():
                if "norm" in name.lower():
                    value += 0.15 * torch.randn(value.shape, generator=gen)
                else:
                    value += 0.08 * value.std() * torch.randn(value.shape, generator=gen)
            state[name] = value
        experts.append(state)
    return experts


def _merged(base: nn.Module, experts: list[dict[str, torch.Tensor]]) -> nn.Module:
    model = copy.deepcopy(base)
    model.load_state_dict({k: torch.stack([e[k] for e in experts]).mean(0) for k in experts[0]})
    return model.eval()


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=60,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _family(name: str):
    if name == "bert":
        base = make_base()
        return base, _experts(base, "encoder."), BertAdapter(), make_calib()
    base = _llama()
    calib = {
        task: [{"input_ids": b["input_ids"]} for b in batches]
        for task, batches in make_calib().items()
    }
    return base, _experts(base, ".layers."), LlamaAdapter(), calib


# -- (2) the fit lowers the error on its own data -----------------------------------------------
@pytest.mark.parametrize("x_source", ["quantized", "expert"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_each_norm_error_drops_on_the_data_it_was_fitted_on(
    family: str, x_source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recorded during the fit: every call's (x̂, y); the weighted error of the merged
    affine and of the fitted one, computed here from those rows."""
    base, experts, adapter, calib = _family(family)
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    original_sums = norms_module.raw_sums

    def recording(xhat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows.append((xhat.double(), y.double()))
        return original_sums(xhat, y)

    monkeypatch.setattr(norms_module, "raw_sums", recording)
    errors: list[tuple[str, float, float]] = []
    fit = norms_module.BlockNorms.fit

    def one_by_one(self, names, calls, twins, expert_calls, weights, reuse=None) -> None:
        for name in names:
            norm = self.block.get_submodule(name)
            old = [
                p.detach().double().clone() for p in norms_module.affine_of(norm) if p is not None
            ]
            rows.clear()
            fit(self, [name], calls, twins, expert_calls, weights, reuse)
            new = [p.detach().double() for p in norms_module.affine_of(norm) if p is not None]
            errors.append(
                (f"{self.prefix}.{name}", _error(rows, calls, old), _error(rows, calls, new))
            )

    monkeypatch.setattr(norms_module.BlockNorms, "fit", one_by_one)
    model = _merged(base, experts)
    quantize_model(
        model, adapter, calib, method="epmq", grid=GRID, experts=experts, x_source=x_source,
        task_weights=WEIGHTS, norm_correction=True, engine=EngineOptions(progress=False),
    )  # fmt: skip
    assert len(errors) == 2 * len(adapter.norms(adapter.blocks(model, adapter.stages(model)[0])[0]))
    for name, before, after in errors:
        assert after <= before * (1 + 1e-6), name
    assert sum(a for _, _, a in errors) < 0.99 * sum(b for _, b, _ in errors)


def _error(rows, calls, params: list[torch.Tensor]) -> float:
    """Σ_i w_i mean_t ‖γ x̂ + β − y‖² over the recorded rows (task i: its calls, in order)."""
    gamma, beta = params[0], params[1] if len(params) > 1 else 0.0
    total, start = 0.0, 0
    for w, task_calls in zip(WEIGHTS, calls.values(), strict=True):
        chunk = rows[start : start + len(task_calls)]
        start += len(task_calls)
        n = sum(x.shape[0] for x, _ in chunk)
        total += w * sum(float(((gamma * x + beta - y) ** 2).sum()) for x, y in chunk) / n
    assert start == len(rows)
    return total


# -- (3) resume replays the fitted norms ------------------------------------------------------
class _Stop(Exception):
    pass


def _stop_after_block_0(stage: str, index: int) -> None:
    if index == 0:
        raise _Stop


@pytest.mark.parametrize("x_source", ["quantized", "merged", "expert"])
def test_resume_replays_the_fitted_norms(tmp_path: Path, x_source: str) -> None:
    """Interrupted after block 0 and resumed from its checkpoint == uninterrupted, every
    parameter bit for bit (``merged``: the norms are loaded before the stream is replayed)."""
    base, experts, adapter, calib = _family("bert")
    kwargs = dict(
        method="gptq", grid=GRID, experts=experts, x_source=x_source, norm_correction=True
    )
    full = _merged(base, experts)
    quantize_model(full, adapter, calib, **kwargs, engine=EngineOptions(progress=False))
    norm = "encoder.layer.0.attention.output.LayerNorm.weight"
    assert not torch.equal(full.get_parameter(norm), _merged(base, experts).get_parameter(norm))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Stop):
        quantize_model(
            _merged(base, experts), adapter, calib, **kwargs,
            engine=EngineOptions(checkpoint_dir=ckpt, on_block_end=_stop_after_block_0,
                                 progress=False),
        )  # fmt: skip
    resumed = _merged(base, experts)
    run = quantize_model(
        resumed, adapter, calib, **kwargs,
        engine=EngineOptions(checkpoint_dir=ckpt, progress=False),
    )  # fmt: skip
    assert run.resumed_blocks == 1
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


# -- (5) off by default, and then nothing changes ---------------------------------------------
def test_without_norm_correction_no_norm_is_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default (and explicit false): the fit never runs, every norm keeps its merged value,
    and the linears equal the default run's bit for bit."""
    base, experts, adapter, calib = _family("llama")

    def refuse(*args, **kwargs) -> None:
        raise AssertionError("norms fitted without norm_correction")

    monkeypatch.setattr(norms_module.BlockNorms, "fit", refuse)
    runs = []
    for extra in ({}, {"norm_correction": False}):
        model = _merged(base, experts)
        run = quantize_model(
            model, adapter, calib, method="epmq", grid=GRID, experts=experts,
            engine=EngineOptions(progress=False), **extra,
        )  # fmt: skip
        assert run.settings["norm_correction"] is False
        runs.append(model)
    merged = _merged(base, experts)
    for (name, a), b, m in zip(
        runs[0].named_parameters(), runs[1].parameters(), merged.parameters(), strict=True
    ):
        assert torch.equal(a, b), name
        if "norm" in name:
            assert torch.equal(a, m), name


def test_norm_correction_needs_the_experts() -> None:
    base, experts, adapter, calib = _family("bert")
    with pytest.raises(EpmqError, match="expert"):
        quantize_model(
            _merged(base, experts), adapter, calib, method="gptq", grid=GRID,
            norm_correction=True, engine=EngineOptions(progress=False),
        )  # fmt: skip
