"""Per-module formats: exact round trips of codes, scales and zeros; reference layouts; refusals."""

from __future__ import annotations

import pytest
import torch
from export_gptq_reference import autogptq_pack_rows

from epmq.errors import EpmqError
from epmq.export import check_weight, get_format, gptq_format
from epmq.export import compressed_tensors_format as ct
from epmq.quant import QuantGrid, gptq, rtn

OUT, IN = 48, 128


def _weight(seed: int) -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed))


def _hessian(seed: int) -> torch.Tensor:
    x = torch.randn(IN, 4 * IN, generator=torch.Generator().manual_seed(seed + 1))
    x = x * torch.linspace(0.1, 3.0, IN)[torch.randperm(IN)].unsqueeze(1)  # uneven diag -> reorder
    return x @ x.T / x.shape[1]


def _quantize(bits: int, group_size: int, symmetric: bool, act_order: bool):
    grid = QuantGrid(bits, group_size, symmetric)
    if act_order:
        return gptq(_weight(bits), _hessian(bits), grid, act_order=True)
    return rtn(_weight(bits), grid)


GRIDS = [
    (bits, group_size, symmetric)
    for bits in (2, 3, 4, 8)
    for group_size in (32, -1)
    for symmetric in (True, False)
]


def _assert_gptq_round_trip(result, q, checkpoint_format: str | None) -> dict:
    tensors = gptq_format.pack_module(q, checkpoint_format=checkpoint_format)
    bits, n_groups, out_f = q.bits, q.n_groups, q.shape[0]
    assert tensors["qweight"].shape == (IN * bits // 32, out_f)
    assert tensors["qzeros"].shape == (n_groups, -(-out_f * bits // 32))
    assert tensors["scales"].shape == (n_groups, out_f)
    assert tensors["scales"].dtype == torch.float16
    assert tensors["g_idx"].dtype == torch.int32
    fmt = checkpoint_format or gptq_format.default_checkpoint_format(q.symmetric)
    codes, scales, zeros, g_idx = gptq_format.unpack_module(tensors, bits, fmt)
    assert torch.equal(codes, result.codes.to(torch.int32))
    assert torch.equal(zeros, result.zeros.to(torch.int32))
    assert torch.equal(g_idx, result.g_idx)
    assert torch.equal(scales, result.scales.to(torch.float16).to(torch.float32))
    return tensors


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), GRIDS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_layout_round_trip(bits: int, group_size: int, symmetric: bool, act_order: bool):
    """Default format (v1 symmetric, v2 asymmetric): exact for every grid, zero points 0 too."""
    result = _quantize(bits, group_size, symmetric, act_order)
    q = check_weight("m", result)
    if group_size > 0:
        assert q.act_order == act_order  # a reordered g_idx is really exercised
    _assert_gptq_round_trip(result, q, None)
    if not bool((q.zeros == 0).any()):  # v1 holds the asymmetric grids without a zero point 0
        _assert_gptq_round_trip(result, q, gptq_format.V1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_v2_stores_zero_points_as_is(bits: int, act_order: bool) -> None:
    """Non-negative rows give zero point 0: v2 stores it exactly, and its qzeros are AutoGPTQ's
    packing of the plain zero points (v1's are of zero - 1, which cannot hold 0)."""
    w = torch.randn(64, IN, generator=torch.Generator().manual_seed(bits))
    w[:32] = w[:32].abs()  # zero point 0 in these rows, mixed zero points in the others
    grid = QuantGrid(bits, 32, symmetric=False)
    result = gptq(w, _hessian(bits), grid, act_order=True) if act_order else rtn(w, grid)
    q = check_weight("enc.fc", result)
    assert bool((q.zeros == 0).any()) and bool((q.zeros > 0).any())
    assert q.act_order == act_order
    tensors = _assert_gptq_round_trip(result, q, gptq_format.V2)
    qzeros = autogptq_pack_rows(q.zeros.numpy(), bits).T
    assert torch.equal(tensors["qzeros"], torch.from_numpy(qzeros.copy()))
    with pytest.raises(EpmqError, match=r"enc\.fc\.zeros: zero point 0 .*v1.*format 'gptq'"):
        gptq_format.pack_module(q, checkpoint_format=gptq_format.V1)


def test_gptq_stores_zero_minus_one() -> None:
    q = check_weight("m", rtn(_weight(0), QuantGrid(4, 32, symmetric=True)))
    qzeros = gptq_format.pack_module(q)["qzeros"]
    # symmetric 4-bit: z = 8 stored as 7 in every nibble
    assert bool((qzeros == 0x77777777).all())


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), GRIDS)
def test_compressed_tensors_round_trip(bits: int, group_size: int, symmetric: bool) -> None:
    result = _quantize(bits, group_size, symmetric, act_order=False)
    q = check_weight("m", result)
    tensors = ct.pack_module(q, torch.float32)
    assert tensors["weight_packed"].shape == (OUT, -(-IN * bits // 32))
    assert tensors["weight_shape"].tolist() == [OUT, IN]
    assert ("weight_zero_point" in tensors) == (not symmetric)
    codes, scales, zeros, g_idx = ct.unpack_module(tensors, bits, group_size, symmetric)
    assert torch.equal(codes, result.codes.to(torch.int32))
    assert torch.equal(zeros, result.zeros.to(torch.int32))
    assert torch.equal(scales, result.scales.to(torch.float32))
    assert torch.equal(g_idx, result.g_idx)


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), GRIDS)
def test_compressed_tensors_matches_reference_compressor(
    bits: int, group_size: int, symmetric: bool
) -> None:
    """Our tensors equal what compressed-tensors' own PackedQuantizationCompressor writes."""
    pq = pytest.importorskip("compressed_tensors.compressors.pack_quantized.base")
    from compressed_tensors.quantization import QuantizationScheme

    q = check_weight("m", _quantize(bits, group_size, symmetric, act_order=False))
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=ct.scheme_weights(bits, group_size, symmetric),
        format=ct.FORMAT,
    )
    offset = 2 ** (bits - 1)
    state = {"weight": q.dequantize(), "weight_scale": q.scales}
    if not symmetric:
        state["weight_zero_point"] = (q.zeros - offset).to(torch.int8)  # signed zero points
    reference = pq.PackedQuantizationCompressor.compress(state, scheme)
    ours = ct.pack_module(q, torch.float32)
    assert set(ours) == set(reference)
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key
    # and its decompressor gives back our dequantized weight
    restored = pq.PackedQuantizationCompressor.decompress(dict(reference), scheme)["weight"]
    torch.testing.assert_close(restored, q.dequantize(), rtol=0, atol=1e-6)


def test_compressed_tensors_refuses_act_order() -> None:
    q = check_weight("enc.fc", _quantize(4, 32, False, act_order=True))
    with pytest.raises(EpmqError, match=r"enc\.fc: act-order.*actorder='group'.*'gptq'"):
        ct.pack_module(q, torch.float16)


def test_compressed_tensors_still_rejects_group_actorder() -> None:
    """The reason for the refusal above: the installed compressed-tensors has no scheme that
    carries weight_g_idx. If this fails, a release accepts actorder='group' again and act-order
    exports can be reconsidered."""
    cq = pytest.importorskip("compressed_tensors.quantization")
    with pytest.raises(ValueError, match="actorder='group' has been removed"):
        cq.QuantizationArgs(num_bits=4, group_size=32, strategy="group", actorder="group")


def test_static_groups_act_order_is_plain_layout() -> None:
    result = gptq(_weight(2), _hessian(2), QuantGrid(4, 32), act_order=True, static_groups=True)
    q = check_weight("m", result)
    assert not q.act_order
    assert "weight_packed" in ct.pack_module(q, torch.float16)


def test_config_parses_with_compressed_tensors() -> None:
    cq = pytest.importorskip("compressed_tensors.quantization")
    weights = {
        "a": check_weight("a", rtn(_weight(0), QuantGrid(4, 32, True))),
        "b": check_weight("b", rtn(_weight(1), QuantGrid(4, 32, True))),
    }
    config = ct.quantization_config(weights, ["a", "b", "head"])
    parsed = cq.QuantizationConfig.model_validate(config)
    assert parsed.format == "pack-quantized"
    assert parsed.quantization_status == "compressed"
    assert parsed.ignore == ["head"]
    args = parsed.config_groups["group_0"].weights
    assert (args.num_bits, args.group_size, args.strategy, args.symmetric) == (4, 32, "group", True)
    # mixed grids: one group per scheme, each naming its modules
    weights["b"] = check_weight("b", rtn(_weight(1), QuantGrid(8, -1, False)))
    mixed = cq.QuantizationConfig.model_validate(ct.quantization_config(weights, ["a", "b"]))
    targets = sorted(g.targets[0] for g in mixed.config_groups.values())
    assert targets == ["a", "b"]
    assert mixed.config_groups["group_1"].weights.strategy == "channel"


def test_gptq_config_refuses_mixed_grids() -> None:
    weights = {
        "l.0.a": check_weight("a", rtn(_weight(0), QuantGrid(4, 32, True))),
        "l.1.a": check_weight("b", rtn(_weight(1), QuantGrid(3, 32, True))),
    }
    with pytest.raises(EpmqError, match="one grid"):
        gptq_format.quantization_config(weights, [])
    weights["l.1.a"] = check_weight("b", rtn(_weight(1), QuantGrid(4, 32, True)))
    config = gptq_format.quantization_config(weights, [])
    assert config["block_name_to_quantize"] == "l"
    assert config["modules_in_block_to_quantize"] == [["a"]]
    assert (config["bits"], config["group_size"], config["sym"]) == (4, 32, True)
    assert config["checkpoint_format"] == "gptq"
    assert config["desc_act"] is False


def test_gptq_config_names_the_checkpoint_format() -> None:
    sym = {"l.0.a": check_weight("a", rtn(_weight(0), QuantGrid(4, 32, True)))}
    asym = {"l.0.a": check_weight("a", rtn(_weight(0), QuantGrid(4, 32, False)))}
    assert gptq_format.quantization_config(sym, [])["checkpoint_format"] == "gptq"
    assert gptq_format.quantization_config(asym, [])["checkpoint_format"] == "gptq_v2"
    forced = get_format("gptq-v1").quantization_config(asym, [])
    assert (forced["checkpoint_format"], forced["sym"]) == ("gptq", False)
    with pytest.raises(EpmqError, match="unknown GPTQ checkpoint format 'gptq_v3'"):
        gptq_format.quantization_config(sym, [], checkpoint_format="gptq_v3")


def test_unknown_format_lists_valid_ones() -> None:
    with pytest.raises(EpmqError, match="compressed-tensors, dequantized, gptq"):
        get_format("awq")


def test_check_weight_names_the_bad_field() -> None:
    result = rtn(_weight(0), QuantGrid(4, 32))
    with pytest.raises(EpmqError, match=r"enc\.fc\.codes: shape"):
        check_weight("enc.fc", result, (OUT, IN + 1))
    result.zeros[0, 0] = 2.5
    with pytest.raises(EpmqError, match=r"enc\.fc\.zeros: zero points must be integer"):
        check_weight("enc.fc", result)
    result = rtn(_weight(0), QuantGrid(4, 32))
    result.scales[0, 0] *= 2  # parts no longer match the dequantized weight
    with pytest.raises(EpmqError, match=r"enc\.fc\.weight: does not equal"):
        check_weight("enc.fc", result)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_tensors_match_autogptq_packer(bits: int) -> None:
    """qweight and qzeros equal AutoGPTQ's loops (qzeros: zeros - 1 packed along `out`)."""
    w = torch.randn(64, IN, generator=torch.Generator().manual_seed(bits))
    q = check_weight("m", rtn(w, QuantGrid(bits, 32, symmetric=True)))
    ours = gptq_format.pack_module(q)
    qweight = autogptq_pack_rows(q.codes.t().numpy(), bits)
    qzeros = autogptq_pack_rows((q.zeros - 1).numpy(), bits).T
    assert torch.equal(ours["qweight"], torch.from_numpy(qweight))
    assert torch.equal(ours["qzeros"], torch.from_numpy(qzeros.copy()))
