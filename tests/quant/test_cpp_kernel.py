"""The compiled CPU int8 kernel (quant/csrc/int8_mm.cpp) against float64 x @ dequantize(W)^T, on every ISA path
this CPU runs (forced, so the AVX2 and plain C++ paths are tested on an AVX-512 machine too), and the warning
when it cannot build. No vLLM engine.

Tolerance, per output element (float64 reference y = x @ W_hat^T, W_hat = q * scale exactly as dequantize gives):
- int16 activations: each x is off by at most half a step, amax(block) / 65534, so the dot product by at most
  sum_k amax(block of k) / 65534 * |W_hat[n, k]|;
- fp32 arithmetic (integer block sums are exact; their fp32 conversion, the per-block scaling and accumulation,
  the lane reduction): relative 2^-24 per operation over at most a few dozen blocks, bounded by 1e-5 * sum |x W|;
- the output rounding: half an ulp of the output dtype, bounded by 2^-8 |y| (bf16), 2^-11 |y| (fp16), 2^-23 |y|
  (fp32).

The byte-plane loops of the VNNI path (per-channel scales, K a multiple of 64; U8_MIN_ROWS rows and more, in
16-row panels from PANEL_MIN_ROWS) quantize per row instead of per block: the same bound with the block as long as
the row; their integer sums and the sums' combination are exact, the scaling is in float64. Both loops do the
same arithmetic in the same order with the operands the other way round, so they must agree bit for bit.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from vllm_normswap.quant import cpp_kernel
from vllm_normswap.quant.primitives import dequantize, quantize

ext = cpp_kernel.loaded()
pytestmark = pytest.mark.skipif(ext is None, reason="the compiled kernel did not build (no C++ compiler?)")
ISAS = cpp_kernel.available_isas()
OUT_REL = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -23}
BLOCK = 256  # the kernel's per-channel activation block (cpp_kernel.int8_mm's default)


def bound(x: torch.Tensor, w_hat: torch.Tensor, block: int, want: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The per-element error bound of the module docstring."""
    xd = x.double().abs()
    xm = torch.empty_like(xd)
    for k0 in range(0, x.shape[1], block):
        xm[:, k0:k0 + block] = xd[:, k0:k0 + block].amax(dim=1, keepdim=True)
    aw = w_hat.abs().t()
    return (xm / 65534) @ aw + 1e-5 * (xd @ aw) + OUT_REL[dtype] * want.abs() + 1e-30


def planes_apply(x, scale, isa) -> bool:
    """Where either byte-plane loop can run (the module docstring)."""
    k = x.shape[1]
    return isa == "avx512vnni" and scale.shape[1] == 1 and k % 64 == 0 and 64 <= k <= 65536


def uses_byte_planes(x, scale, isa, panel_rows, u8_rows) -> bool:
    return planes_apply(x, scale, isa) and x.shape[0] >= min(max(1, panel_rows), max(1, u8_rows))


def check(x, q, scale, isa, block=BLOCK, panel_rows=None, u8_rows=None):
    panel_rows = ext.PANEL_MIN_ROWS if panel_rows is None else panel_rows
    u8_rows = ext.U8_MIN_ROWS if u8_rows is None else u8_rows
    got = ext.int8_mm(x, q, scale, cpp_kernel.ISAS.index(isa), block, panel_rows, u8_rows)
    w_hat = dequantize(q, scale.expand(q.shape[0], scale.shape[1]), torch.float64)
    want = x.double() @ w_hat.t()
    assert got.dtype == x.dtype and got.shape == want.shape
    gs = q.shape[1] // scale.shape[1]
    err = (got.double() - want).abs()
    if uses_byte_planes(x, scale, isa, panel_rows, u8_rows):
        lim = bound(x, w_hat, x.shape[1], want, x.dtype)
    else:
        lim = bound(x, w_hat, gs if scale.shape[1] > 1 else block, want, x.dtype)
    assert bool((err <= lim).all()), (isa, tuple(x.shape), tuple(q.shape), float((err / lim).max()))
    return got


def weights(n, k, granularity, seed, group=None):
    g = torch.Generator().manual_seed(seed)
    return quantize((torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16), granularity, group)


SHAPES = [(m, n, k) for m, (n, k) in zip((1, 2, 3, 5, 7, 8, 9, 17, 33, 64, 130),
                                          itertools.cycle([(257, 40), (3, 136), (1, 520), (257, 2050), (17, 136)]))]
SHAPES += [(1, 3, 40), (130, 1, 8), (9, 257, 520), (4, 16, 2050), (33, 3, 2050)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_per_channel_odd_shapes(isa, dtype):
    for i, (m, n, k) in enumerate(SHAPES):
        q, scale = weights(n, k, "channel", i)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(100 + i)).to(dtype)
        check(x, q, scale, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [8, 32, 128])
def test_per_group(isa, group):
    for i, (m, n, k) in enumerate([(1, 257, 520), (3, 17, 1024), (9, 3, 2048), (33, 64, 136 * 8)]):
        if k % group:
            continue
        q, scale = weights(n, k, "group", i, group)
        assert scale.shape == (n, k // group)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
        check(x, q, scale, isa)


@pytest.mark.parametrize("isa", ISAS)
def test_per_tensor_scale_shared_and_expanded(isa):
    q, scale = weights(257, 520, "tensor", 1)
    assert scale.shape == (1, 1)
    x = torch.randn(5, 520).to(torch.bfloat16)
    shared = check(x, q, scale, isa)
    assert torch.equal(shared, check(x, q, scale.expand(257, 1).contiguous(), isa))


@pytest.mark.parametrize("isa", ISAS)
def test_zero_and_outlier_rows(isa):
    """A zero row gives exact zeros; a row with one huge activation keeps the small ones' precision in the other
    blocks (the int16 loop's bound is per block; the byte planes' per row); a non-finite activation gives NaN, not
    garbage."""
    q, scale = weights(64, 1024, "channel", 7)
    x = torch.randn(6, 1024).to(torch.bfloat16)
    x[0] = 0
    x[1, 3] = 3e4
    x[2, 700] = -1e5
    x[3, :256] = 1e-30  # subnormal-scale values in a block of their own
    got = check(x, q, scale, isa)
    assert bool((got[0] == 0).all())
    x[4, 5] = float("inf")
    x[5, 5] = float("nan")
    got = ext.int8_mm(x, q, scale, cpp_kernel.ISAS.index(isa))
    assert bool(got[4:].isnan().all()) and bool(got[:4].isfinite().all())


@pytest.mark.parametrize("isa", ISAS)
def test_fp16_activations_and_scales(isa):
    q, scale = weights(33, 520, "channel", 3)
    x = torch.randn(7, 520).to(torch.float16)
    check(x, q, scale.to(torch.float16), isa)


@pytest.mark.parametrize("isa", ISAS)
def test_bitwise_identical_across_thread_counts(isa):
    """The work split (over N, and over M where N is small) never changes an output's arithmetic."""
    before = torch.get_num_threads()
    cases = [(m, n, k, gran) for (m, n, k) in [(1, 1030, 2050), (3, 257, 520), (8, 520, 1024), (130, 3, 256),
                                                (64, 1100, 512)] for gran in ("channel", "group")]
    try:
        for i, (m, n, k, gran) in enumerate(cases):
            q, scale = weights(n, k, gran, i, 128 if k % 128 == 0 else 2)
            x = torch.randn(m, k).to(torch.bfloat16)
            outs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                outs.append(ext.int8_mm(x, q, scale, cpp_kernel.ISAS.index(isa)))
            assert torch.equal(outs[0], outs[1]), (isa, m, n, k, gran)
    finally:
        torch.set_num_threads(before)


def test_vnni_and_plain_avx512_agree_bitwise():
    """Integer block sums are exact, so vpdpwssd and vpmaddwd + vpaddd give the same bits."""
    if "avx512vnni" not in ISAS:
        pytest.skip("no AVX512-VNNI here")
    for gran in ("channel", "group"):
        q, scale = weights(257, 2050 if gran == "channel" else 2048, gran, 5, 128)
        x = torch.randn(9, q.shape[1]).to(torch.bfloat16)
        assert torch.equal(ext.int8_mm(x, q, scale, 3), ext.int8_mm(x, q, scale, 2))


VNNI_ONLY = pytest.mark.skipif("avx512vnni" not in ISAS, reason="no AVX512-VNNI here")


@VNNI_ONLY
@pytest.mark.parametrize("threads", [1, 2])
def test_byte_planes_at_every_row_count_and_odd_shapes(threads):
    """The byte-plane loop forced from one row on (u8_rows=1): odd M (register-tile and thread-split tails), odd N
    (the weight-stream layout's and the tile's tails), K from one 64-step up to 4160, several weight chunks per thread
    (1031 x 2048: the next chunk prefetched), bf16/fp32/fp16 activations, per-channel and per-tensor scales, on 1
    and 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i, (m, n, k) in enumerate([(1, 3, 64), (2, 257, 192), (3, 17, 1024), (5, 1031, 128), (7, 5, 2048),
                                       (13, 66, 64), (40, 129, 320), (130, 9, 512), (9, 1031, 2048),
                                       (6, 37, 4096), (4, 41, 4160)]):
            for gran, dtype in (("channel", torch.bfloat16), ("tensor", torch.bfloat16),
                                ("channel", torch.float32), ("channel", torch.float16)):
                q, scale = weights(n, k, gran, i)
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(300 + i)).to(dtype)
                assert uses_byte_planes(x, scale, "avx512vnni", 10 ** 9, 1)
                check(x, q, scale if dtype != torch.float16 else scale.half(), "avx512vnni", panel_rows=10 ** 9,
                      u8_rows=1)
    finally:
        torch.set_num_threads(before)


@VNNI_ONLY
def test_byte_planes_run_only_where_they_apply():
    """Below U8_MIN_ROWS rows, for K not a multiple of 64 and for per-group scales the VNNI path runs the int16 loop,
    which gives the same bits as the AVX-512BW path; where the byte planes apply it does not (another rounding of
    the activations: per row, not per block of 256)."""
    rows = ext.U8_MIN_ROWS
    q, scale = weights(257, 520, "channel", 9)
    q2, scale2 = weights(257, 512, "channel", 9)
    qg, scale_g = weights(257, 512, "group", 9, 128)
    for x, w, s in [(torch.randn(rows - 1, 512), q2, scale2), (torch.randn(rows, 520), q, scale),
                    (torch.randn(rows, 512), qg, scale_g)]:
        assert torch.equal(ext.int8_mm(x, w, s, 3), ext.int8_mm(x, w, s, 2))
    x = torch.randn(rows, 512)
    assert not torch.equal(ext.int8_mm(x, q2, scale2, 3), ext.int8_mm(x, q2, scale2, 2))


# (panel_rows, u8_rows) forcing each byte-plane loop at every row count
PLANE_LOOPS = {"u8": (10 ** 9, 1), "panel": (1, 10 ** 9)}


@VNNI_ONLY
@pytest.mark.parametrize("loop", PLANE_LOOPS)
@pytest.mark.parametrize("k", [4096, 4160])
@pytest.mark.parametrize("sign", [1, -1])
def test_byte_planes_extreme_sums_are_exact(loop, k, sign):
    """The largest sums the byte planes can meet: every activation at the row's maximum (x_q + 32768 = 65535 or
    1) against weights of -128 or 127: 256 H + L reaches 65535 * 128 * K, past int32 from K = 256 (a combination of
    the planes in int32 before the lane sum overflows here, with the sign flipped). The result must be exact
    before the fp32 output rounding (float64 reference on the same int8 weight: only the output's half ulp left)."""
    q = torch.full((8, k), -128, dtype=torch.int8)
    q[1::2] = 127
    scale = torch.full((8, 1), 1e-3)
    x = torch.full((5, k), 3.0 * sign)
    x[1] = -x[1]
    x[2, ::2] = 0.0  # half the row at x_q = 0 (x_q + 32768 = 32768): both planes' bytes vary
    got = ext.int8_mm(x, q, scale, cpp_kernel.ISAS.index("avx512vnni"), BLOCK, *PLANE_LOOPS[loop])
    want = x.double() @ (q.double() * 1e-3).t()
    assert torch.allclose(got.double(), want, rtol=2.0 ** -23, atol=0), float((got.double() - want).abs().max())


@VNNI_ONLY
@pytest.mark.parametrize("loop", PLANE_LOOPS)
def test_byte_planes_outlier_rows_stay_below_the_weight_error(loop):
    """A row with one activation 10 to 10^4 times the others (the outliers this project is about) gets one scale
    for the whole row, so its small activations are rounded coarser than in the int16 loop's blocks. The error
    that adds must stay well below what int8 weights cost anyway: per row, the rms error against float64 of the
    same int8 weight, over the rms of the int8 weight's own error (docs/int8-kernels.md estimates 1/13 at
    K = 8192; measured 0.09). A loop that lost the low byte plane would be near 1 or above."""
    g = torch.Generator().manual_seed(0)
    k = 8192
    w = (torch.randn(256, k, generator=g) * 0.02).to(torch.bfloat16)
    q, scale = quantize(w, "channel")
    w_hat = dequantize(q, scale, torch.float64)
    x = torch.randn(5, k, generator=g)
    for i, factor in enumerate((1, 10, 100, 1e3, 1e4)):
        x[i, 7] = 3 * factor
    x = x.to(torch.bfloat16).float()  # fp32 in and out: the output rounding does not hide the kernel's error
    exact = x.double() @ w_hat.t()
    weight_err = (exact - x.double() @ w.double().t()).pow(2).mean(1).sqrt()
    got = ext.int8_mm(x, q, scale, cpp_kernel.ISAS.index("avx512vnni"), BLOCK, *PLANE_LOOPS[loop])
    kernel_err = (got.double() - exact).pow(2).mean(1).sqrt()
    assert bool((kernel_err < 0.2 * weight_err).all()), (kernel_err / weight_err).tolist()


@VNNI_ONLY
@pytest.mark.parametrize("threads", [1, 2])
def test_byte_plane_panels_match_the_byte_plane_loop_bitwise(threads):
    """The panel loop forced from one row on (panel_rows=1) against the byte-plane loop forced likewise: the same
    bits at odd M (the rows past the last whole panel take the row tiles: 1, 15, 17, 33, 130), odd N (weight-row tails that are copied: 3, 9, 257,
    1031), K from one 64-step to 4160, several weight chunks per thread and the next one prefetched (1031 x 2048),
    rows split across threads where N is small (130 x 9), bf16/fp32/fp16 activations, per-channel and per-tensor
    scales, 1 and 2 threads; and within the byte planes' bound against float64."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    vnni = cpp_kernel.ISAS.index("avx512vnni")
    try:
        for i, (m, n, k) in enumerate([(1, 3, 64), (15, 257, 192), (17, 16, 1024), (33, 1031, 2048), (7, 9, 4096),
                                       (16, 66, 64), (130, 9, 512), (40, 129, 320), (20, 41, 4160)]):
            for gran, dtype in (("channel", torch.bfloat16), ("tensor", torch.bfloat16),
                                ("channel", torch.float32), ("channel", torch.float16)):
                q, scale = weights(n, k, gran, i)
                scale = scale if dtype != torch.float16 else scale.half()
                x = torch.randn(m, k, generator=torch.Generator().manual_seed(500 + i)).to(dtype)
                got = check(x, q, scale, "avx512vnni", panel_rows=1, u8_rows=10 ** 9)
                assert torch.equal(got, ext.int8_mm(x, q, scale, vnni, BLOCK, *PLANE_LOOPS["u8"])), (m, n, k, gran)
    finally:
        torch.set_num_threads(before)


@VNNI_ONLY
def test_byte_plane_panels_keep_zero_and_non_finite_rows():
    """In a panel, a zero row gives exact zeros and a row with inf or NaN gives NaN, without touching its
    neighbours in the same panel."""
    q, scale = weights(24, 256, "channel", 11)
    x = torch.randn(20, 256).to(torch.bfloat16)
    x[0] = 0
    x[3, 5] = float("inf")
    x[17, 9] = float("nan")
    got = ext.int8_mm(x, q, scale, cpp_kernel.ISAS.index("avx512vnni"), BLOCK, *PLANE_LOOPS["panel"])
    assert bool((got[0] == 0).all()) and bool(got[3].isnan().all()) and bool(got[17].isnan().all())
    rest = [i for i in range(20) if i not in (0, 3, 17)]
    assert bool(got[rest].isfinite().all())


@pytest.mark.parametrize("isa", ISAS)
def test_each_loop_the_plan_can_force_is_where_it_applies_and_within_its_bound(isa):
    """cpp_kernel.loops (what the plan times) and default_loop (its incumbents) ask the extension which inner loop
    runs; this test states independently where each applies (planes_apply), over activation dtypes, scale
    granularities, K on and off the byte planes' 64-multiple, and row counts about the default bounds. Each loop the plan can name, forced through loop_mm at odd shapes, stays within that loop's bound."""
    code = cpp_kernel.ISAS.index(isa)
    for dtype, (gran, group), k in itertools.product((torch.bfloat16, torch.float32, torch.float16),
                                                    (("channel", None), ("group", 8)), (192, 520)):
        q, scale = weights(9, k, gran, k, group)
        scale = scale.to(dtype)
        g = scale.shape[1]
        x1 = torch.ones(1, k, dtype=dtype)
        want = ("int16", "u8", "panel") if planes_apply(x1, scale, isa) else ("int16",)
        assert cpp_kernel.loops(k, g, code) == want, (isa, dtype, gran, k)
        for m in (1, 4, 5, 16, 17, 64, 65, 256):
            xm = torch.ones(m, k, dtype=dtype)
            expect = ("int16" if not planes_apply(xm, scale, isa) else "panel" if m >= ext.PANEL_MIN_ROWS
                      else "u8" if m >= ext.U8_MIN_ROWS else "int16")
            assert cpp_kernel.default_loop(m, k, g, code) == expect, (isa, dtype, gran, k, m)
    for i, (m, n, k) in enumerate([(3, 257, 192), (7, 17, 2048), (66, 5, 128)]):
        q, scale = weights(n, k, "channel", 40 + i)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(40 + i)).to(torch.bfloat16)
        for loop in cpp_kernel.loops(k, 1, code):
            panel_rows, u8_rows = cpp_kernel.LOOP_ROWS[loop]
            got = check(x, q, scale, isa, panel_rows=panel_rows, u8_rows=u8_rows)
            assert torch.equal(cpp_kernel.loop_mm(loop)(x, q, scale, isa=code), got)


def test_default_isa_is_the_best_that_cpu_and_torch_allow():
    """torch's capability (ATEN_CPU_CAPABILITY) caps the path: scripts/as_avx2.sh holds an AVX-512 CPU to AVX2."""
    cap = {"AVX2": 1, "AVX512": 3}.get(torch.backends.cpu.get_cpu_capability(), ext.best_isa())
    assert cpp_kernel.default_isa() == min(ext.best_isa(), cap)


def test_bad_shapes_are_refused_by_name():
    q, scale = weights(8, 64, "channel", 0)
    with pytest.raises(RuntimeError, match="columns"):
        ext.int8_mm(torch.randn(2, 32).to(torch.bfloat16), q, scale, 0)
    with pytest.raises(RuntimeError, match="scale shape"):
        ext.int8_mm(torch.randn(2, 64).to(torch.bfloat16), q, torch.ones(8, 3), 0)
    assert ext.int8_mm(torch.randn(0, 64).to(torch.bfloat16), q, scale).shape == (0, 8)


def test_failed_build_warns_once_with_the_fix(monkeypatch):
    import vllm_normswap.logs as logs

    seen = []

    class Log:
        def warning(self, msg, *args):
            seen.append(msg % args)

    monkeypatch.setattr(logs, "plugin_logger", lambda name: Log())

    def no_compiler(verbose=False):
        raise RuntimeError("Error checking compiler version for c++: [Errno 2] No such file or directory: 'c++'")

    monkeypatch.setattr(cpp_kernel, "_load", no_compiler)
    cpp_kernel.loaded.cache_clear()
    try:
        assert cpp_kernel.loaded() is None and cpp_kernel.loaded() is None
        assert len(seen) == 1 and "apt-get install g++" in seen[0] and "No such file" in seen[0]
    finally:
        monkeypatch.undo()
        cpp_kernel.loaded.cache_clear()
        assert cpp_kernel.loaded() is not None


def test_prebuilt_kernel_loads_from_a_folder_it_cannot_write(tmp_path):
    """A deployment builds the kernel at image build time and leaves its folder read-only to the server user
    (deploy/Dockerfile.cpu): a new process must import the .so from there and write nothing, and a stale stamp
    (another source) must not be imported."""
    import shutil
    import stat
    import subprocess
    import sys

    assert cpp_kernel.loaded() is not None  # builds (or loads) in the usual folder and writes the stamp
    src = cpp_kernel.build_dir()
    ro = tmp_path / "ext"
    ro.mkdir()
    for name in (f"{cpp_kernel.NAME}.so", f"{cpp_kernel.NAME}.stamp"):
        shutil.copy2(src / name, ro / name)
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)  # root ignores it: the listing below is the check that binds
    code = ("from vllm_normswap.quant import cpp_kernel as c; import torch; "
            "x = torch.randn(3, 64); w = torch.randint(-127, 128, (5, 64), dtype=torch.int8); "
            "print(c.loaded().__file__, float(c.int8_mm(x, w, torch.ones(5, 1)).abs().sum()) > 0)")
    env = {**os.environ, "NORMSWAP_EXT_DIR": str(ro), "PATH": ""}  # no compiler reachable: a build would fail
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == [str(ro / f"{cpp_kernel.NAME}.so"), "True"]
        assert sorted(p.name for p in ro.iterdir()) == sorted([f"{cpp_kernel.NAME}.so", f"{cpp_kernel.NAME}.stamp"])
        ro.chmod(stat.S_IRWXU)
        (ro / f"{cpp_kernel.NAME}.stamp").write_text("another source\n")
        assert cpp_kernel._import_prebuilt(ro) is None
    finally:
        ro.chmod(stat.S_IRWXU)
