"""Every CPU int8 path (cpp, dequant, int8pack) against float64 x @ dequantize(W)^T at odd shapes, on 1 and 2
threads, directly and through torch.ops.normswap.int8_linear with the path forced (NORMSWAP_INT8_KERNEL);
the knob itself. The measured plan that picks among them: test_cpu_plan.py.

Tolerance: relative to max |y|, 0.01 (fp32/fp16/bf16 inputs, bf16 output rounding 2^-8 plus the compiled
kernel's 16-bit activation step, at most 2^-15 of a block's or (byte planes) a row's max; test_cpp_kernel.py
bounds each per element).
"""

from __future__ import annotations

import pytest
import torch

from vllm_normswap.quant import cpp_kernel, cpu_dispatch, cpu_kernels, cpu_op
from vllm_normswap.quant.primitives import dequantize, quantize

PATHS = [p for p in ("cpp", "dequant", "int8pack") if p != "cpp" or cpp_kernel.loaded() is not None]
# (rows, N, K): odd N and K, 1 row to prefill-sized, tiles of dequant_mm that do not divide N
SHAPES = [(1, 301, 96), (2, 3, 136), (3, 257, 520), (5, 33, 2050), (17, 1031, 64), (70, 129, 160), (300, 97, 1024)]


def applies(path: str, k: int, groups: int) -> bool:
    return path != "int8pack" or cpu_kernels.int8pack_applies(k, groups)


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture
def force(monkeypatch):
    """force(path): NORMSWAP_INT8_KERNEL=path for this test (the knob is read once; cache cleared around it)."""
    def set_path(path: str) -> None:
        monkeypatch.setenv(cpu_dispatch.ENV, path)
        cpu_dispatch.forced.cache_clear()

    yield set_path
    monkeypatch.undo()
    cpu_dispatch.forced.cache_clear()


def reference(x, q, scale, bias=None):
    want = x.double() @ dequantize(q, scale.expand(q.shape[0], scale.shape[1]), torch.float64).t()
    return want if bias is None else want + bias.double()


def close(got, want, rel=0.01) -> bool:
    return (got.double() - want).abs().max().item() <= rel * want.abs().max().item()


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_every_path_matches_float64(path, granularity, threads):
    for i, (m, n, k) in enumerate(SHAPES):
        group = 32 if k % 32 == 0 else 8 if k % 8 == 0 else 2
        if not applies(path, k, k // group if granularity == "group" else 1):
            continue
        g = torch.Generator().manual_seed(i)
        q, scale = quantize((torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16), granularity, group)
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        got = cpu_dispatch.KERNELS[path](x, q, scale)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        assert close(got, reference(x, q, scale)), (path, granularity, m, n, k)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_path_takes_fp32_and_fp16_activations(path, dtype):
    q, scale = quantize((torch.randn(257, 544) * 0.05).to(torch.bfloat16), "channel")
    x = torch.randn(9, 544).to(dtype)
    got = cpu_dispatch.KERNELS[path](x, q, scale.to(dtype))
    assert got.dtype == dtype and close(got, reference(x, q, scale))


def test_dequant_mm_keeps_the_weight_exact_per_channel():
    """Per channel the scale goes on the output: fp32 activations give fp32 accuracy (no bf16 weight rounding)."""
    q, scale = quantize(torch.randn(300, 256), "channel")
    x = torch.randn(70, 256)
    got = cpu_kernels.dequant_mm(x, q, scale)
    assert close(got, reference(x, q, scale), rel=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_op_with_forced_path_bias_3d_and_per_tensor_scale(force, path, rows):
    """Through torch.ops.normswap.int8_linear: bias, leading dims, and one [1, 1] per-tensor scale (every path
    indexes the scale by row, so the op expands it)."""
    force(path)
    g = torch.Generator().manual_seed(rows)
    q, scale = quantize((torch.randn(301, 128, generator=g) * 0.05).to(torch.bfloat16), "tensor")
    assert scale.shape == (1, 1)
    x = torch.randn(rows, 2, 128, generator=g).to(torch.bfloat16)
    bias = torch.randn(301, generator=g).to(torch.bfloat16)
    got = cpu_op.apply_int8_linear(x, q, scale, bias)
    assert got.shape == (rows, 2, 301)
    assert close(got.reshape(-1, 301), reference(x.reshape(-1, 128), q, scale, bias))


def test_knob_reads_one_variable_and_names_the_choices(force):
    force("dequant")
    assert cpu_dispatch.forced() == "dequant"
    q, scale = quantize(torch.randn(64, 128).to(torch.bfloat16), "channel")
    assert cpu_dispatch.choose(torch.randn(3, 128).to(torch.bfloat16), q, scale) == "dequant"
    force("auto")
    assert cpu_dispatch.forced() is None
    force("numba")
    with pytest.raises(ValueError, match="auto, cpp, dequant, int8pack"):
        cpu_dispatch.forced()


def test_forced_int8pack_refuses_a_layer_it_cannot_run(force):
    """int8pack needs per-channel scales and K % 32 == 0 (it reads out of bounds otherwise): refused at load,
    naming the layer shape and the fix, instead of garbage at the first forward."""
    force("int8pack")
    cpu_dispatch.check_forced(96, 2048, 1)
    with pytest.raises(ValueError, match=r"\[96 x 520\].*NORMSWAP_INT8_KERNEL=auto"):
        cpu_dispatch.check_forced(96, 520, 1)
    with pytest.raises(ValueError, match="16 scale column"):
        cpu_dispatch.check_forced(96, 2048, 16)
