"""Exit non-zero when the engine died: vLLM 0.32's API server shuts down cleanly and exits 0 after its EngineCore
dies (vllm-project/vllm#48966), so `Restart=on-failure` (systemd) and job controllers that trust the exit status
do not restart it. This guard, installed in the API server process only, notes when vLLM's own
``terminate_if_errored`` finds the engine dead and turns the final exit status into 1.

vLLM internals touched (pinned 0.32): ``launcher.terminate_if_errored`` and the copy imported by name in the
exception handlers (``vllm_error.terminate_if_errored``); both are looked up at call time.
"""

from __future__ import annotations

import atexit
import os
import sys

from vllm_normswap.logs import plugin_logger

log = plugin_logger(__name__)  # under vLLM's "vllm" logger: see vllm_normswap.logs
EXIT_CODE = 1
_LAUNCHER = "vllm.entrypoints.launchers.launcher"
_HANDLERS = "vllm.entrypoints.serve.exception_handling.handlers.vllm_error"
_state = {"installed": False, "engine_died": False}


def install_if_api_server() -> bool:
    """Idempotent; a no-op outside the API server (the launcher module is imported only there)."""
    if _state["installed"] or _LAUNCHER not in sys.modules:
        return False
    import importlib

    launcher = importlib.import_module(_LAUNCHER)
    original = launcher.terminate_if_errored

    def terminate_if_errored(server, engine):
        if engine.errored and not engine.is_running:
            if not _state["engine_died"]:
                log.error("normswap: the engine died; the API server shuts down and exits %d", EXIT_CODE)
            _state["engine_died"] = True
        return original(server, engine)

    launcher.terminate_if_errored = terminate_if_errored
    handlers = sys.modules.get(_HANDLERS) or importlib.import_module(_HANDLERS)
    handlers.terminate_if_errored = terminate_if_errored
    atexit.register(_exit_nonzero_if_engine_died)  # registered early, so it runs after vLLM's own exit hooks
    _state["installed"] = True
    return True


def _exit_nonzero_if_engine_died() -> None:
    if _state["engine_died"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CODE)
