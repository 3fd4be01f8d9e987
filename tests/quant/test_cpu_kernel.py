"""The CPU int8 matmul op (both its decode and prefill branches) against float64 x @ dequantize(W)^T."""

from __future__ import annotations

import pytest
import torch

from vllm_normswap.quant import cpu_kernel
from vllm_normswap.quant.primitives import dequantize, quantize


@pytest.mark.parametrize("granularity", ["channel", "group"])
@pytest.mark.parametrize("rows", [1, 7, cpu_kernel.DECODE_MAX_ROWS + 1, 300])
def test_int8_linear_matches_dequantized_reference(granularity, rows):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(384, 512, generator=g) * 0.05).to(torch.bfloat16)
    q, scale = quantize(w, granularity, 128)
    x = torch.randn(rows, 512, generator=g).to(torch.bfloat16)
    bias = torch.randn(384, generator=g).to(torch.bfloat16)
    want = x.double() @ dequantize(q, scale, torch.float64).t() + bias.double()
    got = cpu_kernel.apply_int8_linear(x, q, scale, bias)  # through torch.ops.vllm.normswap_int8_linear
    assert got.shape == (rows, 384) and got.dtype == torch.bfloat16
    err = (got.double() - want).abs().max().item()
    assert err < 0.02 * want.abs().max().item(), err  # bf16 output rounding (2^-8 relative) plus accumulation


def test_3d_input_keeps_leading_dims():
    q, scale = quantize(torch.randn(64, 128).to(torch.bfloat16), "channel")
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    assert cpu_kernel.int8_linear(x, q, scale, None).shape == (2, 3, 64)
