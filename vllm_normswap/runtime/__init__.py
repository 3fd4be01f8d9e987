"""Processes: how vLLM servers are started, forked, stopped and how their exit status is kept honest.

- server.py: ``VLLMServer``, one API-server process (start, wait for /health, stop the whole process group, log);
  the A/B and the tests start servers through it.
- forkserver.py: ``NORMSWAP_FORKSERVER=1``: a helper process imports vLLM once and forks each server or offline
  runner from it (``python -m vllm_normswap.runtime.forkserver``).
- engine_fork.py: ``NORMSWAP_FORK_ENGINE=1``: inside an API server, EngineCore and the worker are forked instead of
  spawned (installed by the plugin's ``register()``).
- exit_code.py: an API server whose engine died exits 1, not vLLM 0.32's 0 (installed by ``register()``).

Nothing here imports the model, the int8 method or the observer; ab/, serve.py and the tests build on it.
"""
