"""Container entrypoint (Dockerfile, deploy/Dockerfile.cpu, docker-compose.yml, deploy/k8s): one vLLM server for one
NormSwap option, activation observer on, configured by environment variables so that compose files and
Kubernetes manifests need no shell quoting of JSON.

    NORMSWAP_OPTION       an option id (required; `normswap --help` lists them, from vllm_normswap/registry.py)
    NORMSWAP_MODEL        checkpoint directory (default: the option's embedded zoo model)
    NORMSWAP_INT8         1 = int8 weight-only linear layers (--quantization normswap_int8); default 0
    NORMSWAP_OBSERVE      the observer's config as JSON, e.g. '{"thresholds": [3, 6, 20]}'; 'off' disables it
                          (default: on with the observer's defaults)
    NORMSWAP_PROBE_SHIFT  mean-shift probe constant c added before the pre-FFN norm (default 0 = off)
    HOST, PORT            listen address (default 0.0.0.0:8000)
    VLLM_API_KEY          the server's API key (vLLM reads it; keeps it off the command line: docs/security.md)
Arguments are further vLLM server flags (e.g. --tensor-parallel-size 2 --enforce-eager); they win over the
serving config. The server replaces this process (exec), so signals and the exit code are vLLM's own.
"""

from __future__ import annotations

import json
import os
import sys

from vllm_normswap.registry import OPTIONS
from vllm_normswap.serve import CPU_KV_CACHE_GB, default_model, server_argv


def fail(message: str) -> None:
    sys.exit(f"deploy/entrypoint.py: {message}")


def observer_override(value: str) -> dict | bool:
    if value.strip().lower() in ("off", "false", "0"):
        return False
    if not value.strip():
        return True
    try:
        config = json.loads(value)
    except json.JSONDecodeError as e:
        fail(f"NORMSWAP_OBSERVE is not JSON ({e}); example: '{{\"thresholds\": [3, 6, 20]}}', or 'off'")
    if not isinstance(config, dict):
        fail(f"NORMSWAP_OBSERVE must be a JSON object such as '{{\"thresholds\": [6]}}', got {value!r}")
    return {"enabled": True, **config}


def build_argv(env: dict, extra: list[str]) -> list[str]:
    option = env.get("NORMSWAP_OPTION", "")
    if option not in OPTIONS:
        fail(f"NORMSWAP_OPTION={option!r}: set it to one of {', '.join(OPTIONS)}")
    try:
        shift = float(env.get("NORMSWAP_PROBE_SHIFT", "0") or 0)
        port = int(env.get("PORT", "8000"))
    except ValueError as e:
        fail(f"NORMSWAP_PROBE_SHIFT must be a number and PORT an integer ({e})")
    int8 = env.get("NORMSWAP_INT8", "0").strip().lower() in ("1", "true", "yes")
    overrides: dict = {"normswap_observe": observer_override(env.get("NORMSWAP_OBSERVE", ""))}
    if shift:
        overrides["probe_shift"] = shift
    model = env.get("NORMSWAP_MODEL") or default_model(option)
    return server_argv(option, model, port, env.get("HOST", "0.0.0.0"), int8, overrides, extra)


def main() -> None:
    argv = build_argv(dict(os.environ), sys.argv[1:])
    if os.environ.get("NORMSWAP_PRINT_COMMAND") == "1":  # for the image's install check and for debugging
        print(json.dumps(argv))
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GB)  # ignored by the GPU build
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
