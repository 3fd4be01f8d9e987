"""The llama.cpp column of ``bench_int8.py --sweep``: llama_cpp_peer.py run in an interpreter that has
llama-cpp-python (the 'bench' extra), on the same shape and box; or why the column is left out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from machine import EMULATED_AVX2


def peer_python(a) -> str | None:
    """The interpreter that runs llama_cpp_peer.py: --peer-python, else this one if it has llama_cpp."""
    if a.peer_python:
        return a.peer_python
    import importlib.util

    return sys.executable if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("gguf") else None


def run_peer(a, threads: list[int], batches: tuple[int, ...]) -> tuple[dict | None, str]:
    """llama.cpp Q8_0 on the same shape and box: {threads: {measure: tok/s}}, or None and why not."""
    if EMULATED_AVX2:
        return None, ("llama.cpp column left out: its build targets this CPU's own ISA (GGML_NATIVE), which "
                      "scripts/as_avx2.sh cannot hold to AVX2")
    python = peer_python(a)
    if not python:
        return None, ("llama.cpp column left out: no llama-cpp-python here (install the 'bench' extra, or pass "
                      "--peer-python)")
    cmd = [python, str(Path(__file__).with_name("llama_cpp_peer.py")), "--threads", *map(str, threads),
           "--batches", ",".join(map(str, batches)), "--layers", str(a.layers), "--hidden", str(a.hidden),
           "--ffn", str(a.ffn), "--vocab", str(a.vocab)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        return None, f"llama.cpp column left out: {' '.join(cmd[1:2])} failed (exit {proc.returncode})"
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    return ({int(t): r for t, r in out["threads"].items()},
            f"llama.cpp Q8_0 via llama-cpp-python {out['llama_cpp_python']} (every 2-D weight Q8_0, LM head included)")
