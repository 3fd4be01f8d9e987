"""The A/B's in-process tail, after every server has stopped: per option, the fp32 reference model's scores of the
documents (the precision floor), its mean-shift probe curve (ab/probe.py) and the per-linear int8 attribution
(ab/attribution.py).

Each option's work runs in one thread: on a shared 2-core box OpenMP's spinning threads made this small model's
elementwise ops 50x slower (1.5 s instead of 27 ms a document) whenever anything else ran. One thread leaves the
other cores idle, so options run side by side in worker processes, one thread each, as many as there are cores,
options and memory for (``workers``). A busy box then time-shares processes instead of spinning threads. The
numbers do not depend on it: each option is the same code on the same documents in one thread. The workers are
spawned, not forked: a fork copies this process's threads (tqdm, HTTP pools) and libgomp state, a spawn starts clean.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

PHASES = ("quality", "probe", "attribution")  # the report's time split: the floor is quality, the curve probe


@dataclass(frozen=True)
class Settings:
    """What every option's tail needs from the command line (picklable, for the workers)."""
    top_k: int
    probe_grid: tuple[float, ...]
    probe_layers: tuple[int, ...] | None
    attribution: bool
    attribution_docs: int  # the first N documents (0 = all)
    attribution_layers: tuple[int, ...] | None
    passthrough: tuple[str, ...] = ()  # vLLM flags after --: the int8 servers' quantization_config, if any

    @classmethod
    def from_args(cls, args) -> "Settings":
        return cls(args.top_k, tuple(args.probe_grid), tuple(args.probe_layers) or None, args.attribution == "on",
                   args.attribution_docs, tuple(args.attribution_layers) or None,
                   tuple(getattr(args, "passthrough", None) or ()))


@dataclass
class Tail:
    """One option's results; an error string where a piece failed (a checkpoint the reference cannot load, say)."""
    scores: list | None = None
    floor_error: str | None = None
    curve: list | dict | None = None
    attribution: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # per phase, this option's worker


def option_tail(checkpoint: str, docs: list[list[int]], s: Settings) -> Tail:
    """The floor's scores, the probe curve and the attribution of one checkpoint, in one thread."""
    import torch

    from vllm_normswap.ab import attribution
    from vllm_normswap.ab.probe import reference_curve
    from vllm_normswap.ab.quality import reference_scores
    from vllm_normswap.registry import DEFAULT_THRESHOLDS

    torch.set_num_threads(1)
    out = Tail()
    t0 = time.monotonic()
    try:
        out.scores = reference_scores(checkpoint, docs, s.top_k)
    except Exception as e:  # no floor for this option, said so in the report
        out.floor_error = f"{type(e).__name__}: {e}"
    t1 = time.monotonic()
    try:
        out.curve = reference_curve(checkpoint, docs, s.probe_grid, DEFAULT_THRESHOLDS, s.probe_layers)
    except Exception as e:
        out.curve = {"error": f"{type(e).__name__}: {e}"}
    t2 = time.monotonic()
    if s.attribution:
        try:
            out.attribution = attribution.measure(
                checkpoint, docs[:s.attribution_docs or len(docs)], attribution.int8_settings(checkpoint, s.passthrough),
                list(s.attribution_layers) if s.attribution_layers else None, DEFAULT_THRESHOLDS, s.top_k)
        except Exception as e:
            out.attribution = {"error": f"{type(e).__name__}: {e}"}
    out.seconds = {"quality": t1 - t0, "probe": t2 - t1, "attribution": time.monotonic() - t2}
    return out


def workers(ckpts: dict[str, str]) -> int:
    """Worker processes: one per option, at most one per core this process may use, and only as many as memory
    holds. A worker holds the fp32 model (at most twice the checkpoint's files, which are bf16 or fp32), its int8
    copies and the attribution's cached activations: budgeted at 4x the files plus 1 GiB."""
    import psutil

    files = max(sum(f.stat().st_size for f in Path(p).glob("*.safetensors")) for p in ckpts.values())
    per_worker = 4 * files + 2**30
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(len(ckpts), cores, psutil.virtual_memory().available // per_worker))


def _ignore_sigint() -> None:
    """In a worker: Ctrl-C reaches the whole foreground process group; the A/B's own process stops the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_all(ckpts: dict[str, str], docs: list[list[int]], s: Settings, n_workers: int) -> dict[str, Tail]:
    """Every option's tail, ``n_workers`` at a time (1: here, in this process)."""
    bar = tqdm(total=len(ckpts), desc="fp32 reference (floor, probe curve, int8 attribution)", unit="option")
    out: dict[str, Tail] = {}
    if n_workers <= 1:
        import torch

        threads = torch.get_num_threads()
        try:
            for option, path in ckpts.items():
                out[option] = option_tail(path, docs, s)
                bar.update(1)
        finally:
            torch.set_num_threads(threads)
            bar.close()
        return out
    pool = ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint)
    try:
        futures = {pool.submit(option_tail, path, docs, s): option for option, path in ckpts.items()}
        for f in as_completed(futures):
            try:
                out[futures[f]] = f.result()
            except Exception as e:  # the worker died (out of memory, say): this option's pieces say so
                error = f"{type(e).__name__}: {e}"
                out[futures[f]] = Tail(floor_error=error, curve={"error": error},
                                       attribution={"error": error} if s.attribution else None)
            bar.update(1)
    except BaseException:  # interrupted (or a worker died): no worker outlives the run
        for p in list(getattr(pool, "_processes", {}).values()):
            p.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    return out
