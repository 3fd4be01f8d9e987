"""The compiled CPU int8 matmul (csrc/int8_mm.cpp): built with torch's C++ extension loader on first use, cached
outside the source tree, loaded in later processes without rebuilding.

    python -m vllm_normswap.quant.cpp_kernel     # build (or load) it and print the ISA path this CPU runs

The cache directory is $NORMSWAP_EXT_DIR, else ~/.cache/vllm_normswap/torch_extensions/<torch>-<python>: the
.so is tied to the torch and Python it was built against, so each pair gets its own. Building needs a C++
compiler and ninja; without them ``loaded()`` logs one warning and returns None, and the plan (cpu_plan.py)
chooses among the pure-torch paths.

The ISA path: the best one the CPU and torch both allow (torch's capability honours ATEN_CPU_CAPABILITY, so a
user who caps torch at AVX2 caps this kernel too; scripts/as_avx2.sh does). ``int8_mm(..., isa=)`` forces a
lower one (tests, benchmarks).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import torch

NAME = "normswap_int8_mm"
SOURCE = Path(__file__).resolve().parent / "csrc" / "int8_mm.cpp"
# the extension's ISA codes 0..3; avx512vnni adds the byte-plane loops: from U8_MIN_ROWS rows, and in 16-row
# panels from PANEL_MIN_ROWS rows (csrc/int8_mm.cpp)
ISAS = ("scalar", "avx2", "avx512bw", "avx512vnni")
# the extension's inner loops (csrc/int8_mm.cpp): int16 on every path, byte planes ("u8") and byte planes in 16-row
# panels ("panel") on the VNNI path; its row bounds pick one by default, the plan (cpu_plan.py) forces the one it
# measured
LOOPS = ("int16", "u8", "panel")
_NEVER = 1 << 62  # a row bound no call reaches
# int8_mm's (panel_rows, u8_rows) that make a call of any row count run the loop where it applies, else the int16
# loop (the extension's pick_loop)
LOOP_ROWS = {"int16": (_NEVER, _NEVER), "u8": (_NEVER, 1), "panel": (1, _NEVER)}
# torch.backends.cpu.get_cpu_capability() -> the highest of our paths it allows
_TORCH_CAP = {"DEFAULT": 0, "NO AVX": 0, "AVX2": 1, "AVX512": 3, "ZVECTOR": 0, "VSX": 0}
FIX = "install g++ (apt-get install g++) and ninja, then run scripts/install.sh"


def build_dir() -> Path:
    env = os.environ.get("NORMSWAP_EXT_DIR")
    if env:
        return Path(env)
    tag = f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return Path.home() / ".cache" / "vllm_normswap" / "torch_extensions" / tag


CFLAGS = ("-O3", "-fopenmp")  # tuples: torch's loader appends to the lists it is given
LDFLAGS = ("-fopenmp",)


def stamp() -> str:
    """What the built .so depends on: the source, the flags, torch and Python. Written beside the .so after a
    build, so that a later process can import the .so directly when nothing changed."""
    import hashlib

    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(repr((CFLAGS, LDFLAGS, torch.__version__, sys.version_info[:2])).encode())
    return h.hexdigest()


def _import_prebuilt(d: Path):
    """The .so in ``d`` when its stamp matches this source, imported as a plain extension module; else None.
    Writes nothing: a deployment can build the kernel at image build time and leave its folder read-only to the
    server user (torch's own loader takes a lock file in the folder even when nothing is rebuilt)."""
    import importlib.util

    so, stamp_file = d / f"{NAME}.so", d / f"{NAME}.stamp"
    try:
        if not so.is_file() or stamp_file.read_text().strip() != stamp():
            return None
    except OSError:
        return None
    spec = importlib.util.spec_from_file_location(NAME, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(verbose: bool = False):
    import shutil

    from torch.utils import cpp_extension

    d = build_dir()
    module = _import_prebuilt(d)
    if module is not None:
        return module
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (torch's extension builder needs it)")
    d.mkdir(parents=True, exist_ok=True)
    if not os.access(d, os.W_OK):
        raise RuntimeError(f"{d} holds no kernel built from this source and is not writable: build it there as "
                           f"its owner (python -m vllm_normswap.quant.cpp_kernel) or set NORMSWAP_EXT_DIR to a "
                           f"writable folder")
    # -fopenmp: at::parallel_for is inline (ATen/ParallelOpenMP.h) and needs it to run in parallel at all; the
    # .so then needs libgomp.so.1, which resolves to the copy torch has loaded already (one thread pool).
    module = cpp_extension.load(name=NAME, sources=[str(SOURCE)], build_directory=str(d), verbose=verbose,
                                extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS))
    from vllm_normswap.atomic import write_text_atomic

    write_text_atomic(d / f"{NAME}.stamp", stamp() + "\n")
    return module


@functools.lru_cache(maxsize=None)
def loaded():
    """The extension module, or None (with one warning naming the problem and the fix) where it cannot build."""
    try:
        return _load()
    except Exception as err:  # no compiler, no ninja, a compile error: the pure-torch paths remain
        from vllm_normswap.logs import plugin_logger

        first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
        plugin_logger(__name__).warning(
            "normswap_int8: the compiled CPU int8 kernel is unavailable (%s: %s); falling back to the slower "
            "pure-torch kernels. To fix: %s (it builds into %s).", type(err).__name__, first, FIX, build_dir())
        return None


@functools.lru_cache(maxsize=None)
def default_isa() -> int:
    """The ISA path: the best the CPU and torch's capability both allow."""
    ext = loaded()
    best = ext.best_isa() if ext is not None else 0
    cap = _TORCH_CAP.get(torch.backends.cpu.get_cpu_capability(), best)
    return min(best, cap)


def int8_mm(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, isa: int | None = None,
            block: int = 256, panel_rows: int | None = None, u8_rows: int | None = None) -> torch.Tensor:
    """x2 [M, K] (bf16/fp16/fp32) @ int8 weight [N, K] with scale [N, 1], [N, K/G] or [1, G] -> [M, N] in x2's
    dtype. ``isa``: an ISAS index (default ``default_isa()``); ``block``: the activation quantization block along
    K for per-channel scales (per group: the group size); ``panel_rows`` and ``u8_rows``: on the VNNI path, the row
    counts from which the byte planes in 16-row panels and the byte-plane loop run (defaults: the extension's
    PANEL_MIN_ROWS and U8_MIN_ROWS)."""
    ext = loaded()
    return ext.int8_mm(x2, weight, scale, default_isa() if isa is None else isa, block,
                       ext.PANEL_MIN_ROWS if panel_rows is None else panel_rows,
                       ext.U8_MIN_ROWS if u8_rows is None else u8_rows)


def default_loop(m: int, k: int, groups: int, isa: int | None = None) -> str:
    """The inner loop the extension's own row bounds pick for M rows of K inputs with ``groups`` scale columns."""
    return loaded().loop_for(default_isa() if isa is None else isa, m, k, groups)


def loops(k: int, groups: int, isa: int | None = None) -> tuple[str, ...]:
    """The inner loops this CPU can run for K inputs with ``groups`` scale columns (any activation dtype): each
    loop forced in turn, as the extension falls through where one does not apply."""
    isa = default_isa() if isa is None else isa
    ran = {loaded().loop_for(isa, 1, k, groups, *LOOP_ROWS[loop]) for loop in LOOPS}
    return tuple(loop for loop in LOOPS if loop in ran)


@functools.lru_cache(maxsize=None)
def loop_mm(loop: str):
    """int8_mm with ``loop`` forced at every row count (where it applies): what a plan's "cpp:<loop>" runs."""
    panel_rows, u8_rows = LOOP_ROWS[loop]
    return functools.partial(int8_mm, panel_rows=panel_rows, u8_rows=u8_rows)


def available_isas() -> tuple[str, ...]:
    """The paths this CPU runs (every one up to the best), for the tests."""
    ext = loaded()
    return () if ext is None else ISAS[:ext.best_isa() + 1]


def build() -> int:
    t = time.perf_counter()
    try:
        ext = _load(verbose="-v" in sys.argv)
    except Exception as err:
        print(f"build failed: {err}\nfix: {FIX}", file=sys.stderr)
        return 1
    print(f"{NAME}: loaded in {time.perf_counter() - t:.1f} s from {build_dir()}")
    print(f"ISA path: {ISAS[default_isa()]} (CPU best: {ISAS[ext.best_isa()]}, torch capability: "
          f"{torch.backends.cpu.get_cpu_capability()}); threads: {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    sys.exit(build())
