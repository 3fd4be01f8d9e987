"""The on-disk cache of the int8 kernel plan (cpu_plan.py): one JSON file per machine fingerprint under
~/.cache/vllm_normswap/int8_plan/, as oneDNN, cuBLAS heuristics and Inductor's autotuning cache theirs.

The fingerprint is everything a timing depends on besides the shape and the thread count: the CPU model and the
ISA flags that pick kernels (ours, oneDNN's and vLLM's), the core count, torch's CPU capability (honours
ATEN_CPU_CAPABILITY) and whether it sees native bf16, oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA), the torch and vLLM
versions, and a hash of our kernels' sources. The file name is a hash of
it, and the file holds it too: a file whose fingerprint differs (copied from another machine, or an edited
kernel) is foreign, and is ignored with a warning, as is one that does not parse. Entries are keyed by shape,
scale columns, activation dtype and torch thread count. Writes are atomic (a temporary file, then os.replace), so
a reader never sees half a file; two processes measuring at once may each rewrite it, and the last one wins.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch

from vllm_normswap.atomic import write_text_atomic
from vllm_normswap.cpuinfo import cpu_model_and_flags
from vllm_normswap.logs import plugin_logger
from vllm_normswap.quant.cpu_kernels import native_bf16

FORMAT = 3  # 2: a bucket names the compiled kernel's loop ("cpp:u8"); 3: "cpp:panel" replaced "cpp:bf16"
HERE = Path(__file__).resolve().parent
KERNEL_SOURCES = (HERE / "csrc" / "int8_mm.cpp", HERE / "cpu_kernels.py", HERE / "cpu_plan.py")
# /proc/cpuinfo flags that change which kernel wins: ISA levels of ours, of oneDNN's bf16 GEMM and of vLLM's
ISA_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def _log():
    return plugin_logger(__name__)


@functools.lru_cache(maxsize=None)
def fingerprint() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        vllm_version = version("vllm")
    except PackageNotFoundError:
        vllm_version = "none"
    model, flags = cpu_model_and_flags()
    isa = [f for f in ISA_FLAGS if f in flags]
    sources = hashlib.sha256(b"".join(p.read_bytes() for p in KERNEL_SOURCES)).hexdigest()[:16]
    return {"format": FORMAT, "cpu": model, "flags": isa, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(),
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""), "vllm": vllm_version,
            "kernel_sources": sources}


def cache_dir() -> Path:
    return Path.home() / ".cache" / "vllm_normswap" / "int8_plan"


def cache_path() -> Path:
    digest = hashlib.sha256(json.dumps(fingerprint(), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"{digest}.json"


def entry_key(n: int, k: int, groups: int, dtype: torch.dtype, threads: int) -> str:
    return f"{n}x{k} g{groups} {str(dtype).removeprefix('torch.')} t{threads}"


def _valid(entry, paths: tuple[str, ...], buckets: int) -> bool:
    """{"kernels": [a kernel per bucket, one of ``paths``], "ms": {name: [ms per bucket]}}; "ms" is for the log
    and may be empty."""
    if not isinstance(entry, dict) or not isinstance(entry.get("kernels"), list):
        return False
    ms = entry.get("ms", {})
    return (len(entry["kernels"]) == buckets and all(kernel in paths for kernel in entry["kernels"])
            and isinstance(ms, dict) and all(isinstance(v, list) and len(v) == buckets
                                             and all(isinstance(t, (int, float)) and t > 0 for t in v)
                                             for v in ms.values()))


def load(paths: tuple[str, ...], buckets: int, warn: bool = True) -> dict[str, dict]:
    """The entries of this machine's cache file; {} (with a warning naming the file and the reason) where it is
    missing, does not parse, or was written under another fingerprint. Entries of the wrong form are dropped."""
    path = cache_path()
    if not path.is_file():
        return {}
    say = _log().warning if warn else (lambda *a: None)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise ValueError("no 'entries' object")
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        say("normswap_int8: ignoring the corrupted kernel plan cache %s (%s); the plan is measured again and the "
            "file rewritten", path, err)
        return {}
    ours = fingerprint()
    theirs = data.get("fingerprint")
    if theirs != ours:
        differs = sorted(k for k in ours if not isinstance(theirs, dict) or theirs.get(k) != ours[k])
        say("normswap_int8: ignoring the kernel plan cache %s: it was measured under another machine or "
            "software (differs in: %s); the plan is measured again", path, ", ".join(differs) or "format")
        return {}
    entries = {key: e for key, e in data["entries"].items() if _valid(e, paths, buckets)}
    if len(entries) != len(data["entries"]):
        say("normswap_int8: %d malformed entries in the kernel plan cache %s ignored",
            len(data["entries"]) - len(entries), path)
    return entries


def save(key: str, entry: dict, paths: tuple[str, ...], buckets: int) -> None:
    """Add one entry (merged with what the file holds now) and replace the file atomically. A cache that cannot
    be written (a read-only home) costs a measurement at the next start, with one warning."""
    path = cache_path()
    entries = load(paths, buckets, warn=False)
    entries[key] = entry
    body = json.dumps({"fingerprint": fingerprint(), "entries": dict(sorted(entries.items()))}, indent=1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, body + "\n")
    except OSError as err:
        _log().warning_once("normswap_int8: cannot write the kernel plan cache %s (%s); each start measures "
                            "the plan again", path, err)
