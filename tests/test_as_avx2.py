"""scripts/as_avx2.sh holds every ISA choice to AVX2 on a bigger CPU: torch's capability, vLLM's native library
(read from the process's own memory map, not from what the script claims), our int8 extension's path; and it
leaves the venv as it found it. On the AVX2 kind itself every answer is AVX2 anyway."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
light = "torch" not in sys.modules  # the hook waits for torch.cpu: no eager torch import
import torch
from vllm.platforms import current_platform
current_platform.import_kernels()
from vllm_normswap.quant import cpp_kernel
libs = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in open("/proc/self/maps") if "vllm/_C" in line})
print(json.dumps({"light": light, "capability": torch.backends.cpu.get_cpu_capability(),
                  "avx512": torch.cpu._is_avx512_supported(), "amx": torch.cpu._is_amx_tile_supported(),
                  "vllm_libs": libs, "int8_path": cpp_kernel.ISAS[cpp_kernel.default_isa()]}))
"""


def test_every_isa_choice_is_avx2_and_the_venv_is_left_clean():
    proc = subprocess.run(["scripts/as_avx2.sh", sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"light": True, "capability": "AVX2", "avx512": False, "amx": False,
                   "vllm_libs": ["_C_AVX2.abi3.so"], "int8_path": "avx2"}, got
    site = Path(sysconfig.get_paths()["purelib"])
    assert not (site / "_normswap_as_avx2.pth").exists()
