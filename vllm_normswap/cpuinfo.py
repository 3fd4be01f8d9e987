"""The CPU's model name and ISA flags, read from /proc/cpuinfo: the int8 kernel plan's cache key
(quant/plan_cache.py) and the machine every benchmark records (benchmarks/machine.py).

Standard library only, and so is the package's ``__init__``: benchmarks/machine.py also runs in the llama.cpp
peer's interpreter, which has neither torch nor vLLM.
"""

from __future__ import annotations

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
