"""int8 math (quant/primitives.py) against independent references: a float64 re-implementation of the formula,
the compressed-tensors library's own int32 packer, and SQNR on real checkpoint tensors (all four options)."""

from __future__ import annotations

import pytest
import torch

from vllm_normswap.quant.primitives import (
    QuantConfigError,
    dequantize,
    pack_int8_to_int32,
    quantize,
    sqnr_db,
    unpack_int32_to_int8,
)

SQNR_MIN_DB = 38.0  # the int8 method's bar: per-channel int8, every layer


def reference_quantize(w: torch.Tensor, block_rows: int, block_cols: int):
    """Float64 per-block absmax/127 quantizer written from the formula, blocks of block_rows x block_cols."""
    n, k = w.shape
    w64 = w.double()
    blocks = w64.reshape(n // block_rows, block_rows, k // block_cols, block_cols)
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
    scale = (amax / 127).to(w.dtype).double()  # the scale is rounded to the weight dtype before use
    q = torch.round(blocks / scale).clamp(-127, 127)
    return q.reshape(n, k).to(torch.int8), scale


@pytest.mark.parametrize("granularity,rows,cols", [("channel", 1, 256), ("group", 1, 64), ("tensor", 48, 256)])
def test_quantize_matches_float64_reference(granularity, rows, cols):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 0.05
    q, scale = quantize(w, granularity, 64)
    q_ref, _ = reference_quantize(w, rows, cols)
    # float32 vs float64 division can differ only where w/scale sits within rounding distance of a .5 tie
    assert (q.int() - q_ref.int()).abs().max() <= 1
    assert (q != q_ref).float().mean() < 1e-3
    assert scale.dtype == torch.bfloat16
    assert scale.shape == {"channel": (48, 1), "group": (48, 4), "tensor": (1, 1)}[granularity]


def test_zero_rows_and_outlier_row():
    w = torch.zeros(4, 64, dtype=torch.bfloat16)
    w[1, 3] = 5.0
    q, scale = quantize(w, "channel")
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert q[0].abs().sum() == 0 and q[1, 3] == 127
    assert torch.equal(dequantize(q, scale)[1, 3], torch.tensor(5.0, dtype=torch.bfloat16))


def test_pack_matches_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    packed = pack_int8_to_int32(q)
    assert torch.equal(packed, ct.pack_to_int32(q, 8))
    assert torch.equal(unpack_int32_to_int8(packed), q)
    assert torch.equal(ct.unpack_from_int32(packed, 8, q.shape), q)


def test_bad_settings_fail_clearly():
    w = torch.randn(8, 96)
    with pytest.raises(QuantConfigError, match="unknown granularity 'row'.*channel, group, tensor"):
        quantize(w, "row")
    with pytest.raises(QuantConfigError, match="group_size 64 does not divide the layer input size 96"):
        quantize(w, "group", 64)


@pytest.mark.parametrize("option", ["ln-gelu", "ln-swiglu", "rms-gelu", "rms-swiglu"])
def test_sqnr_per_layer_random_checkpoints(checkpoints, option):
    """Every linear weight of the random checkpoints: per-channel SQNR >= 38 dB (group and tensor reported)."""
    from vllm_normswap.checkpoints.files import load_tensors
    from vllm_normswap.checkpoints.quantize import is_quantized_linear

    worst = {}
    for name, w in load_tensors(checkpoints[option]).items():
        if not is_quantized_linear(name, w):
            continue
        for granularity in ("channel", "tensor"):
            q, scale = quantize(w, granularity)
            db = sqnr_db(w, dequantize(q, scale, torch.float32))
            worst[granularity] = min(worst.get(granularity, 1e9), db)
            if granularity == "channel":
                assert db >= SQNR_MIN_DB, f"{name}: per-channel SQNR {db:.1f} dB < {SQNR_MIN_DB}"
    print(f"{option}: worst per-layer SQNR {worst}")
    assert worst["channel"] >= worst["tensor"]  # a scale per row can only fit better than one per tensor
