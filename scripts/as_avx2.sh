#!/usr/bin/env bash
# Run a command as an AVX2-only CPU would run it, on a CPU with AVX-512: every library that picks a
# code path by ISA is held to AVX2. It emulates the instructions, not the cores (clock, caches, memory).
#
#   scripts/as_avx2.sh .venv/bin/python -m pytest -m "not slow" -n 2      # the test suite on AVX2 code paths
#
# What is held to AVX2, and how:
# - torch's kernels and torch.compile's generated C++: ATEN_CPU_CAPABILITY=avx2;
# - oneDNN (torch's bf16/fp32 matmuls): ONEDNN_MAX_CPU_ISA=AVX2;
# - Numba's generated code: NUMBA_CPU_NAME=haswell;
# - our int8 extension: it follows torch's capability (vllm_normswap/quant/cpp_kernel.py);
# - vLLM's choice of native library (_C_AVX2 instead of _C_AVX512) and attention ISA: vLLM asks
#   torch.cpu._is_avx512_supported() and its siblings, which read the CPU, not the capability. A .pth file in the
#   venv loads scripts/as_avx2_hook.py, which answers False for them, in every Python process of the venv that
#   has NORMSWAP_AS_AVX2=1 (servers, workers, locust, the wheel test's installs); it is removed when the command
#   ends.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: scripts/as_avx2.sh COMMAND [ARGS...]" >&2; exit 2; }
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
pth="$site/_normswap_as_avx2.pth"
echo 'import os, runpy; os.environ.get("NORMSWAP_AS_AVX2") == "1" and runpy.run_path(os.environ["NORMSWAP_AS_AVX2_HOOK"])' >"$pth"
trap 'rm -f "$pth"' EXIT
export NORMSWAP_AS_AVX2_HOOK=$PWD/scripts/as_avx2_hook.py
# compile caches of its own: an inductor cache filled at AVX-512 capability and read at AVX2 gave wrong integer
# results (vLLM's tensor-parallel vocabulary mask: "index out of range in self" in the embedding)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/vllm_normswap/as_avx2
export TORCHINDUCTOR_CACHE_DIR=$cache/torchinductor VLLM_CACHE_ROOT=$cache/vllm
export NORMSWAP_AS_AVX2=1 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 NUMBA_CPU_NAME=haswell
.venv/bin/python - <<'EOF'
import torch
from vllm_normswap.quant import cpp_kernel
assert torch.backends.cpu.get_cpu_capability() == "AVX2" and not torch.cpu._is_avx512_supported()
print(f"as_avx2: torch capability {torch.backends.cpu.get_cpu_capability()}, avx512 seen: "
      f"{torch.cpu._is_avx512_supported()}, int8 extension path: {cpp_kernel.ISAS[cpp_kernel.default_isa()]}",
      flush=True)
EOF
"$@"
