"""The CPU int8 matmul op (both its decode and prefill branches) against float64 x @ dequantize(W)^T."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vllm_normswap.quant import cpu_dispatch, cpu_kernels, cpu_op
from vllm_normswap.quant.primitives import dequantize, quantize


@pytest.mark.parametrize("granularity", ["channel", "group"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 8, cpu_dispatch.knobs().decode_max_rows + 1, 300])
def test_int8_linear_matches_dequantized_reference(granularity, rows):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(384, 512, generator=g) * 0.05).to(torch.bfloat16)
    q, scale = quantize(w, granularity, 128)
    x = torch.randn(rows, 512, generator=g).to(torch.bfloat16)
    bias = torch.randn(384, generator=g).to(torch.bfloat16)
    want = x.double() @ dequantize(q, scale, torch.float64).t() + bias.double()
    got = cpu_op.apply_int8_linear(x, q, scale, bias)  # through torch.ops.normswap.int8_linear
    assert got.shape == (rows, 384) and got.dtype == torch.bfloat16
    err = (got.double() - want).abs().max().item()
    assert err < 0.02 * want.abs().max().item(), err  # bf16 output rounding (2^-8 relative) plus accumulation


@pytest.mark.parametrize("rows", [1, 2, 5, 300])
def test_per_tensor_scale_of_one_element(rows):
    """quantize(w, "tensor") gives one [1, 1] scale (the linear method stores it per row): every path takes it."""
    g = torch.Generator().manual_seed(rows)
    q, scale = quantize((torch.randn(301, 128, generator=g) * 0.05).to(torch.bfloat16), "tensor")
    assert scale.shape == (1, 1)
    x = torch.randn(rows, 128, generator=g).to(torch.bfloat16)
    want = x.double() @ dequantize(q, scale, torch.float64).t()
    got = cpu_dispatch.int8_linear(x, q, scale, None)
    assert (got.double() - want).abs().max().item() < 0.01 * want.abs().max().item()


def test_3d_input_keeps_leading_dims():
    q, scale = quantize(torch.randn(64, 128).to(torch.bfloat16), "channel")
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    assert cpu_dispatch.int8_linear(x, q, scale, None).shape == (2, 3, 64)


@pytest.mark.parametrize("k", [8, 40, 136, 520])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_input_size_not_multiple_of_32(k, rows):
    """Odd input sizes (a TP shard can have one) must not reach torch's int8pack kernel, which reads out of bounds
    there on AVX-512 CPUs: every path against float64."""
    g = torch.Generator().manual_seed(k * 10 + rows)
    q, scale = quantize((torch.randn(96, k, generator=g) * 0.05).to(torch.bfloat16), "channel")
    for _ in range(5):  # out-of-bounds reads show up as garbage in some calls only
        x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
        want = x.double() @ dequantize(q, scale, torch.float64).t()
        got = cpu_dispatch.int8_linear(x, q, scale, None)
        assert (got.double() - want).abs().max().item() < 0.01 * want.abs().max().item()


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("n", [300, 301, 3])  # the GEMV deals rows in quarters; 301 and 3 leave rows over
def test_numba_gemv_matches_int8pack_and_reference(rows, n):
    """The batch-1 Numba GEMV (forced here for any row count) against float64 and against int8pack: same bf16
    rounding of the same fp32 dot products, so at most one bf16 step apart."""
    assert cpu_kernels.compiled_gemv() is not None, "numba ships with vLLM and must import here"
    g = torch.Generator().manual_seed(rows * 1000 + n)
    w = (torch.randn(n, 544, generator=g) * 0.05).to(torch.bfloat16)  # int8pack needs K % 32 == 0
    q, scale = quantize(w, "channel")
    x = torch.randn(rows, 544, generator=g).to(torch.bfloat16)
    got = cpu_kernels.gemv_int8(x, q, scale)
    want = x.double() @ dequantize(q, scale, torch.float64).t()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert (got.double() - want).abs().max().item() < 0.01 * want.abs().max().item()
    pack = torch.ops.aten._weight_int8pack_mm(x, q, scale.view(-1))
    step = pack.double().abs().clamp(min=1e-3) * 2.0 ** -7  # one bf16 ulp (8 significant bits)
    assert bool(((got.double() - pack.double()).abs() <= step).all())


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("group_size", [128, 64])
def test_numba_gemv_per_group_matches_reference(rows, group_size):
    """Per-group scales in the GEMV (each group's dot product scaled, then summed) against float64."""
    g = torch.Generator().manual_seed(rows * 100 + group_size)
    q, scale = quantize((torch.randn(301, 512, generator=g) * 0.05).to(torch.bfloat16), "group", group_size)
    assert scale.shape == (301, 512 // group_size)
    x = torch.randn(rows, 512, generator=g).to(torch.bfloat16)
    got = cpu_kernels.gemv_int8(x, q, scale)
    want = x.double() @ dequantize(q, scale, torch.float64).t()
    assert (got.double() - want).abs().max().item() < 0.01 * want.abs().max().item()


@pytest.mark.parametrize("rows", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n,k", [(301, 512), (3, 40), (2050, 520)])
def test_small_batch_kernels_match_reference(rows, n, k):
    """2..8 rows: fours through mm4, a pair through mm2, a last row through the GEMV; odd N leaves rows over in
    both kernels' stream split. Against float64, and against the GEMV row by row (same fp32 math, so at most one
    bf16 step apart)."""
    g = torch.Generator().manual_seed(rows * 7919 + n + k)
    q, scale = quantize((torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16), "channel")
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    got = cpu_kernels.small_m_int8(x, q, scale)
    want = x.double() @ dequantize(q, scale, torch.float64).t()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert (got.double() - want).abs().max().item() < 0.01 * want.abs().max().item()
    by_row = torch.cat([cpu_kernels.gemv_int8(x[i:i + 1], q, scale) for i in range(rows)])
    step = by_row.double().abs().clamp(min=1e-3) * 2.0 ** -7
    assert bool(((got.double() - by_row.double()).abs() <= step).all())


def test_numba_paths_are_taken_only_where_they_apply(monkeypatch):
    q, scale = quantize(torch.randn(64, 128).to(torch.bfloat16), "channel")
    one = torch.randn(1, 128).to(torch.bfloat16)
    k = dataclasses.replace(cpu_dispatch.knobs(), gemv="auto", kernel="numba")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert cpu_dispatch.choose(one, scale, k) == "gemv"
    assert cpu_dispatch.choose(torch.randn(2, 128).to(torch.bfloat16), scale, k) != "gemv"  # batch > 1
    for rows, small in ((2, True), (k.small_m_max_rows, True), (k.small_m_max_rows + 1, False)):
        assert cpu_dispatch.use_small_m(torch.randn(rows, 128).to(torch.bfloat16), scale, k) is small
    assert cpu_dispatch.choose(one.float(), scale, k) == "int8pack"  # fp32 activations
    assert cpu_dispatch.use_gemv(one, quantize(torch.randn(64, 128).to(torch.bfloat16), "group", 64)[1], k)
    monkeypatch.setattr(torch, "get_num_threads", lambda: k.gemv_max_threads)
    assert cpu_dispatch.use_gemv(one, scale, k)  # one GEMV thread still beats int8pack on 2
    assert not cpu_dispatch.use_small_m(torch.randn(2, 128).to(torch.bfloat16), scale, k)  # but not at M >= 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: k.gemv_max_threads + 1)
    assert not cpu_dispatch.use_gemv(one, scale, k)  # int8pack's parallel loop wins with more threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not cpu_dispatch.use_gemv(one, scale, dataclasses.replace(k, gemv="int8pack"))


@pytest.mark.parametrize("var, value, field, allowed", [
    ("NORMSWAP_INT8_GEMV", "int8pack", "gemv", "auto, numba, int8pack"),
    ("NORMSWAP_INT8_KERNEL", "numba", "kernel", "auto, cpp, numba")])
def test_dispatch_knobs_read_from_the_environment_on_demand(monkeypatch, var, value, field, allowed):
    """The knobs are read when first needed, not at import; an unknown choice is refused naming the choices."""
    monkeypatch.setenv("NORMSWAP_INT8_SMALL_M_MAX_ROWS", "4")
    monkeypatch.setenv(var, value)
    cpu_dispatch.knobs.cache_clear()
    try:
        assert cpu_dispatch.knobs().small_m_max_rows == 4 and getattr(cpu_dispatch.knobs(), field) == value
        monkeypatch.setenv(var, "fast")
        cpu_dispatch.knobs.cache_clear()
        with pytest.raises(ValueError, match=allowed):
            cpu_dispatch.knobs()
    finally:
        monkeypatch.undo()
        cpu_dispatch.knobs.cache_clear()
