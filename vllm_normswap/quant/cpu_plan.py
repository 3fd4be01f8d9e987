"""The int8 kernel plan: for each linear shape and row-count bucket, the CPU path (cpu_dispatch.py) that measured
fastest on this machine, with the worker's torch thread count, timed beside vLLM's own bf16 linear.

Buckets of rows M (tokens in the batch): 1 | 2-4 | 5-16 | 17-64 | 65+. Batch-1 decode is pure weight streaming;
2-4 rows are still bound by the weight reads (the compiled kernel's register tiles hold 3-4 rows); 5-16 and
17-64 are where integer dot products and a vendor GEMM trade places as compute grows; 65+ is prefill, bound by
compute. Each bucket is timed at both ends (1; 2 and 4; 5 and 16; 17 and 64; 65 and 256 for prefill), and a
kernel's time for the bucket is the sum of its two medians: the compiled kernel's loops cross over inside buckets
(the byte planes lose to the int16 loop at 2 rows and may beat it at 4), so one end alone can pick a loop that
loses the other. Each call reads its own copy of the weights, cycled through more than the CPU's last-level cache,
as a served model's weights are (a 1B model's are 40x an L3 of 32 MiB): one copy timed over and over sits in L3 and
favours the kernels that read weights slowly from memory.

Candidates: the compiled kernel once per inner loop that applies here ("cpp:int16", "cpp:u8", "cpp:panel";
cpp_kernel.loops), forced at every row count, and the pure-torch paths. The extension's own row bounds between its
loops (U8_MIN_ROWS, PANEL_MIN_ROWS) were measured on one CPU; here they only name the incumbent of each bucket, and
a loop that is clearly faster on this machine replaces it.

Measurement (``measure``): random activations [M, K] in the model dtype; the layer's own int8 weight; every
candidate and vLLM's bf16 linear (``dispatch_cpu_unquantized_gemm`` on the dequantized weight: oneDNN, SGL,
zentorch or F.linear, whatever the bf16 server would run here) called in turn, the order rotating each round, so
that a busy neighbour slows all of them alike; per candidate the median. The incumbent (the compiled kernel where
it built, with the loop its row bounds pick at the bucket's rows; else int8pack where it applies) keeps the bucket
unless a challenger's median is more than INCUMBENT_MARGIN faster: noise does not flip the plan between starts.
The plan is cached (plan_cache.py); the same cache gives the same plan.

One process times vLLM's bf16 linear at one thread count per shape. Its oneDNN primitives fix their thread count
when they are created and are cached process-wide by shape and row count, so a shape timed again under another
count runs at the first count's speed (measured on a 2-core Zen 4: a [6144 x 2048] matmul of 256 rows made at 1
thread takes 30 ms under 2 threads, 15 ms when made at 2). A server's worker has one thread count; a plan for
another count (``normswap int8-plan --threads 1,2``, the tests), or for a shape this process timed at another
count (an in-process vLLM engine after a test at the default count), is measured in a fresh process started at
that count (``measure_at``); ``measure`` itself refuses a second count for a shape it has timed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

import vllm_normswap.cpuinfo as cpuinfo
import vllm_normswap.quant.cpp_kernel as cpp_kernel
import vllm_normswap.quant.plan_cache as plan_cache
from vllm_normswap.logs import plugin_logger
from vllm_normswap.quant.cpu_kernels import dequant_mm, int8pack_applies, int8pack_mm
from vllm_normswap.quant.primitives import dequantize

PATHS = ("cpp", "dequant", "int8pack")
# what a plan names per bucket: the compiled kernel with one inner loop forced, or a pure-torch path
KERNELS = tuple(f"cpp:{loop}" for loop in cpp_kernel.LOOPS) + PATHS[1:]
BUCKETS = ("1", "2-4", "5-16", "17-64", "65+")
ROWS = (1, 4, 16, 64, 256)  # the row counts each bucket is timed at: its top...
LOW_ROWS = (1, 2, 5, 17, 65)  # ...and its bottom
COPIES_MAX = 64  # weight copies cycled per kernel, at most (tiny shapes; see cpuinfo.cycle_bytes)
INCUMBENT_MARGIN = 0.10  # a challenger must be this much faster (median) to replace the incumbent
BUDGET_S = 0.03  # timed seconds per bucket, all candidates together...
MIN_REPS, MAX_REPS = 3, 40  # ...within these call counts per candidate (the warm-up's second call counts)
SLOW_S = 0.05  # a call this long needs no separate warm-up call
ONE_SHOT_S = 0.2  # a call this long is timed once
ELIMINATE = 3.0  # a challenger this many times slower than the fastest, on its first call, is not timed again
CPP_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def bucket(m: int) -> int:
    """The bucket index of M rows."""
    return 0 if m <= 1 else 1 if m <= 4 else 2 if m <= 16 else 3 if m <= 64 else 4


@dataclasses.dataclass(frozen=True)
class Plan:
    n: int  # output features (weight rows)
    k: int  # input features
    groups: int  # scale columns: 1 per channel, K / group_size per group
    dtype: str  # activation dtype
    threads: int  # torch threads it was measured with
    kernels: tuple[str, ...]  # the path per bucket
    ms: dict  # path or "vllm_bf16" -> median ms per bucket (empty when read from a cache without timings)
    source: str  # "measured" or "cached"

    def row(self) -> dict:
        return {"n": self.n, "k": self.k, "groups": self.groups, "dtype": self.dtype, "threads": self.threads,
                "buckets": dict(zip(BUCKETS, self.kernels)), "ms": self.ms, "source": self.source}

    def summary(self) -> str:
        """One line: per bucket the chosen path and its time against vLLM's bf16 linear."""
        cells = []
        for i, (name, kernel) in enumerate(zip(BUCKETS, self.kernels)):
            ms, ref = self.ms.get(kernel), self.ms.get("vllm_bf16")
            vs = f" {ms[i]:.3g} ms, {ref[i] / ms[i]:.2f}x vLLM bf16" if ms and ref else ""
            cells.append(f"M={name}: {kernel}{vs}")
        return (f"[{self.n} x {self.k}] groups={self.groups} {self.dtype} threads={self.threads} ({self.source}): "
                + "; ".join(cells))


def kernel(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The function behind a plan's kernel name (KERNELS), or a path's (PATHS: "cpp" with its own row bounds)."""
    path, _, loop = name.partition(":")
    if path == "cpp":
        return cpp_kernel.loop_mm(loop) if loop else cpp_kernel.int8_mm
    return {"dequant": dequant_mm, "int8pack": int8pack_mm}[path]


def candidates(k: int, groups: int, dtype: torch.dtype) -> tuple[str, ...]:
    """The kernels that can run this shape here."""
    if dtype in CPP_DTYPES and cpp_kernel.loaded() is not None:
        return tuple(f"cpp:{loop}" for loop in cpp_kernel.loops(k, groups)) + ("dequant",)
    return ("int8pack", "dequant") if int8pack_applies(k, groups) else ("dequant",)


def incumbents(k: int, groups: int, dtype: torch.dtype, paths: tuple[str, ...]) -> tuple[str, ...]:
    """Per bucket, the kernel that keeps it unless another is clearly faster: the compiled kernel with the loop its
    own row bounds pick at the bucket's timed rows, else the first candidate."""
    if paths[0].startswith("cpp:"):
        return tuple(f"cpp:{cpp_kernel.default_loop(rows, k, groups)}" for rows in ROWS)
    return (paths[0],) * len(BUCKETS)


def _vllm_bf16_linear(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """vLLM's own CPU linear for this weight, set up as its UnquantizedLinearMethod does. Its warning that
    oneDNN cannot run bf16 here (then it takes F.linear) is vLLM's business, not this int8 server's."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    log = logging.getLogger(dispatch_cpu_unquantized_gemm.__module__)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    finally:
        log.setLevel(level)
    return lambda x: layer.cpu_linear(x, layer.weight, None)


def _copies(nbytes: int) -> int:
    return max(1, min(COPIES_MAX, -(-cpuinfo.cycle_bytes() // max(nbytes, 1))))


def _median_ms(fns: dict[str, Callable[[], object]], keep: tuple[str, ...]) -> dict[str, float]:
    """Median ms per function: one warm-up call each, then rounds of one call each, the order rotating. A call
    longer than SLOW_S is its own warm-up (its one-off costs are small beside it). Not repeated, so that a slow
    shape costs seconds and not minutes: a call longer than ONE_SHOT_S, and a function outside ``keep`` (the
    incumbent and the reference) whose first call took ELIMINATE times the fastest one's: it cannot win."""
    first = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t
        if first[name] < SLOW_S:
            t = time.perf_counter()
            fn()
            first[name] = time.perf_counter() - t
    fastest = min(first.values())
    names = [name for name in fns if first[name] < ONE_SHOT_S
             and (name in keep or first[name] <= ELIMINATE * fastest)]
    reps = max(MIN_REPS, min(MAX_REPS, int(BUDGET_S / max(sum(first[n] for n in names), 1e-9))))
    samples = {name: [first[name]] for name in fns}
    for r in range(reps - 1 if names else 0):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


_REFERENCE_THREADS: dict[tuple[int, int], int] = {}  # (n, k) -> the thread count vLLM's bf16 linear was timed at


def in_process(n: int, k: int, threads: int) -> bool:
    """Whether this process can time [n x k] at ``threads``: its own count, and the shape not timed at another."""
    return threads == torch.get_num_threads() and _REFERENCE_THREADS.get((n, k), threads) == threads


def measure(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
            paths: tuple[str, ...] | None = None) -> dict[str, list[float]]:
    """Per bucket, the sum of the medians at its two ends (ms) of each candidate and of vLLM's bf16 linear
    ("vllm_bf16") on this weight and its copies, with this process's torch thread count: the one count per shape
    that this process times vLLM's bf16 linear at."""
    n, k = weight.shape
    threads = torch.get_num_threads()
    first = _REFERENCE_THREADS.setdefault((n, k), threads)
    if first != threads:
        raise RuntimeError(f"int8 plan: vLLM's bf16 linear for [{n} x {k}] was timed at {first} thread(s) in this "
                           f"process, and its oneDNN primitives keep that count; measure {threads} thread(s) in a "
                           f"fresh process (cpu_plan.measure_at, or normswap int8-plan --threads {threads})")
    paths = paths or candidates(k, scale.shape[1], dtype)
    held = incumbents(k, scale.shape[1], dtype, paths)
    weights = [weight] + [weight.clone() for _ in range(_copies(n * k) - 1)]
    dense = torch.cat([dequantize(weight[i:i + 4096], scale[i:i + 4096], dtype) for i in range(0, n, 4096)])
    references = [_vllm_bf16_linear(dense)] + [_vllm_bf16_linear(dense.clone())
                                               for _ in range(_copies(2 * n * k) - 1)]
    weight_copies, reference_copies = itertools.cycle(weights), itertools.cycle(references)
    gen = torch.Generator().manual_seed(n * 1_000_003 + k)
    out: dict[str, list[float]] = {name: [] for name in (*paths, "vllm_bf16")}
    for top, low, incumbent in zip(ROWS, LOW_ROWS, held):
        total = dict.fromkeys(out, 0.0)
        for rows in sorted({low, top}):
            x = torch.randn(rows, k, generator=gen).to(dtype)
            # one cycle for every candidate: each call reads the copy after the previous call's, never the one a
            # kernel timed just before it left in cache (that made the byte planes look 2x faster at one row)
            fns = {name: (lambda f=kernel(name): f(x, next(weight_copies), scale)) for name in paths}
            fns["vllm_bf16"] = lambda: next(reference_copies)(x)
            for name, ms in _median_ms(fns, keep=(incumbent, "vllm_bf16")).items():
                total[name] += ms
        for name, ms in total.items():
            out[name].append(ms)
    return out


def choose(ms: dict[str, list[float]], paths: tuple[str, ...],
           held: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Per bucket: the incumbent (``held``, by default paths[0] in every bucket) unless another kernel's median is
    more than INCUMBENT_MARGIN faster."""
    held = held or (paths[0],) * len(BUCKETS)
    chosen = []
    for i, incumbent in enumerate(held):
        best = min(paths, key=lambda p: ms[p][i])
        chosen.append(best if ms[best][i] < (1 - INCUMBENT_MARGIN) * ms[incumbent][i] else incumbent)
    return tuple(chosen)


def random_weight(n: int, k: int, groups: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random int8 weight and scale of the shape: what a plan is measured on without the layer's own
    (timings do not depend on the values)."""
    gen = torch.Generator().manual_seed(n + k)
    weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, groups, generator=gen) * 1e-3 + 1e-4).to(dtype)
    return weight, scale


def measure_at(threads: int, shapes: list[tuple[int, int, int]], dtype: torch.dtype,
               paths: list[tuple[str, ...] | None] | None = None, rounds: int = 1) -> list:
    """``measure`` for each (n, k, groups) on a random weight, with ``threads`` torch threads: in this process
    where that is its thread count, else in one fresh process started at that count (see the module docstring).
    With rounds > 1, per shape a list of that many independent measurements (a choice and its check)."""
    paths = paths or [None] * len(shapes)
    if all(in_process(n, k, threads) for n, k, _ in shapes):
        return _measure_all({"shapes": shapes, "dtype": dtype, "paths": paths, "rounds": rounds})
    spec = {"threads": threads, "shapes": shapes, "dtype": str(dtype).removeprefix("torch."), "paths": paths,
            "rounds": rounds}
    done = subprocess.run([sys.executable, "-m", __name__, json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        raise RuntimeError(f"int8 plan: measuring at {threads} thread(s) in a fresh process failed "
                           f"(exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.split(_MARK)[-1])


_MARK = "normswap int8 plan timings: "  # before the child's JSON (vLLM may log to stdout as well)
_PLANS: dict[tuple, Plan] = {}  # (n, k, groups, dtype, threads) -> this process's plan


def cached_plan(n: int, k: int, groups: int, dtype: torch.dtype, threads: int) -> Plan | None:
    """The plan for one shape as this machine's cache file holds it, or None; measures nothing."""
    entry = plan_cache.load(KERNELS, len(BUCKETS)).get(plan_cache.entry_key(n, k, groups, dtype, threads))
    if entry is None:
        return None
    return Plan(n, k, groups, str(dtype).removeprefix("torch."), threads, tuple(entry["kernels"]),
                entry.get("ms", {}), "cached")


def plan_for(n: int, k: int, groups: int, dtype: torch.dtype, threads: int, weight: torch.Tensor | None = None,
             scale: torch.Tensor | None = None, remeasure: bool = False) -> Plan:
    """The plan for one shape: from this process's memory, else the cache file, else measured now (on ``weight``
    where given, else a random int8 weight of the shape), cached, and logged as one INFO line."""
    plan = None if remeasure else _PLANS.get((n, k, groups, dtype, threads))
    if plan is not None:  # the per-call path: one dict lookup
        return plan
    if weight is None or not in_process(n, k, threads):
        return plans_for([(n, k, groups)], dtype, threads, remeasure)[0]
    plan = None if remeasure else cached_plan(n, k, groups, dtype, threads)
    if plan is None:  # a server's worker: its own thread count, the layer's own weight
        paths = candidates(k, groups, dtype)
        plan = _measured(n, k, groups, dtype, threads, measure(weight, scale, dtype, paths), paths)
    return _keep(plan)


def plans_for(shapes: list[tuple[int, int, int]], dtype: torch.dtype, threads: int,
              remeasure: bool = False) -> list[Plan]:
    """``plan_for`` of each (n, k, groups) on random weights; the shapes to measure are measured together (at
    another thread count than this process's: in one fresh process)."""
    plans = [None if remeasure else _PLANS.get((n, k, g, dtype, threads)) or cached_plan(n, k, g, dtype, threads)
             for n, k, g in shapes]
    todo = [i for i, plan in enumerate(plans) if plan is None]
    paths = [candidates(shapes[i][1], shapes[i][2], dtype) for i in todo]
    for i, p, ms in zip(todo, paths, measure_at(threads, [shapes[i] for i in todo], dtype, paths) if todo else []):
        plans[i] = _measured(*shapes[i], dtype, threads, ms, p)
    return [_keep(plan) for plan in plans]


def _measured(n: int, k: int, groups: int, dtype: torch.dtype, threads: int, ms: dict, paths: tuple) -> Plan:
    """The plan chosen on these timings, written to the cache."""
    plan = Plan(n, k, groups, str(dtype).removeprefix("torch."), threads,
                choose(ms, paths, incumbents(k, groups, dtype, paths)),
                {name: [round(v, 4) for v in ms[name]] for name in ms}, "measured")
    plan_cache.save(plan_cache.entry_key(n, k, groups, dtype, threads),
                    {"kernels": list(plan.kernels), "ms": plan.ms}, KERNELS, len(BUCKETS))
    return plan


def _keep(plan: Plan) -> Plan:
    """Logged as one INFO line and kept in this process's memory."""
    plugin_logger(__name__).info("normswap_int8 kernel plan %s", plan.summary())
    _PLANS[(plan.n, plan.k, plan.groups, getattr(torch, plan.dtype), plan.threads)] = plan
    return plan


def _measure_all(spec: dict) -> list:
    dtype = spec["dtype"] if isinstance(spec["dtype"], torch.dtype) else getattr(torch, spec["dtype"])
    out = []
    for (n, k, g), p in zip(spec["shapes"], spec["paths"]):
        weight, scale = random_weight(n, k, g, dtype)
        runs = [measure(weight, scale, dtype, tuple(p) if p else None) for _ in range(spec["rounds"])]
        out.append(runs[0] if spec["rounds"] == 1 else runs)
    return out


def _child(spec: dict) -> list:
    """``measure_at``'s fresh process: the thread count first, before any oneDNN primitive exists."""
    torch.set_num_threads(spec["threads"])
    return _measure_all(spec)


if __name__ == "__main__":
    print(_MARK + json.dumps(_child(json.loads(sys.argv[1]))))
