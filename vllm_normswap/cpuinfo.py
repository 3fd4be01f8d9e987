"""The CPU's model name and ISA flags, read from /proc/cpuinfo: the int8 kernel plan's cache key
(quant/plan_cache.py) and the machine every benchmark records (benchmarks/machine.py). Its cache sizes, from
sysfs: how many bytes of weight copies a timing cycles through (the plan, benchmarks/bench_int8_kernels.py).

Standard library only, and so is the package's ``__init__``: benchmarks/machine.py also runs in the llama.cpp
peer's interpreter, which has neither torch nor vLLM.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The model name and every flag the kernel lists ("flags" on x86, "Features" on Arm). Without /proc/cpuinfo
    (not Linux): platform's processor name and no flags; without a model name line (Arm): the machine type."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    lines = text.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())
    flags = set(next((ln.split(":", 1)[1] for ln in lines if ln.startswith(("flags", "Features"))), "").split())
    return model, flags


@functools.lru_cache(maxsize=None)
def cycle_bytes() -> int:
    """Bytes of weight copies a kernel timing cycles through, so that every call reads its weight from memory as
    a layer does in the engine: twice the largest CPU cache (sysfs), 64 MiB where it is unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        try:
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0))
        except ValueError:
            continue
    return 2 * max(sizes) if sizes else 64 << 20
