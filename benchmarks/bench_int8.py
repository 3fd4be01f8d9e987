"""bf16 vs normswap_int8 in vLLM on one Llama-shaped model with dummy weights; prints one JSON object.

    python benchmarks/bench_int8.py [--layers 16 --hidden 2048 --ffn 5632 --vocab 44032] [--compiled] [--lm-head]
                                    [--rounds 3] [--threads-bind 0] [--batches 1,8] [--device cpu|cuda]
    python benchmarks/bench_int8.py --sweep [--sweep-threads 1,2] [--peer-python .venv-peer/bin/python]
                                    [--save benchmarks/results/int8_sweep_<kind>.json]

Each configuration runs in its own subprocess (one engine each, same settings; prefix caching off so every
prompt is really prefilled). Figures:
- decode tokens/s at each of --batches (default 1 and 8): (tokens of a 1+D-token generation minus a 1-token
  one) / time difference, so prefill is excluded; roofline = read bandwidth / bytes read per decode step (all
  weights except the embedding table, of which a step reads one row per token);
- prefill tokens/s on 512-token prompts (max_tokens=1);
- resident weight memory: bytes of the model's parameters and buffers inside the worker;
- batch-1 breakdown: the step time split into linear layers and LM head (the same kernels timed standalone at
  M=1: vLLM's own CPU bf16 dispatch, resp. our int8 op) and the rest (attention, norms, sampling, scheduler and
  Python per-step overhead);
- batch-1 profile (--profile, default on): one more engine per configuration, in-process
  (VLLM_ENABLE_V1_MULTIPROCESSING=0) so torch.profiler sees the model runner, decoding D tokens at batch 1:
  per step, the time inside torch ops by kind (int8 GEMV, bf16 GEMM, vLLM's C++ kernels, other aten ops) and
  the rest of the wall time, i.e. Python and scheduling between ops (the profiler adds a few us per op).
--lm-head adds a third configuration, normswap_int8 with `lm_head: true` (the LM head in int8 too).
--device cuda (with the CUDA vLLM wheel): the same engine runs, minus what only means something on CPU (thread
binding, the standalone CPU kernel breakdown, the CPU profile, the int8 LM head); the roofline is the GPU's
memory read bandwidth, measured here.
--sweep: the whole table on this machine, side by side in one run: decode at batch 1, 2, 4, 8, 16, 32 and prefill
512 for bf16, int8 and llama.cpp Q8_0 (benchmarks/llama_cpp_peer.py, same shape) at each of --sweep-threads
worker threads, with every ratio; --save writes it as a result file for benchmarks/README.md.
This file measures; the machine's figures are machine.py's, the llama.cpp column llama_cpp_column.py's (which runs
llama_cpp_peer.py), the result files int8_tables.py's.
Default vocab 44032 makes the model just over 1B parameters (untied LM head, full multi-head attention).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from int8_tables import e2e_table, readme_table
from llama_cpp_column import run_peer
from machine import bind_cpus, cpu_info, gpu_read_bw, read_bw


def kv_cache_gb() -> str:
    """The images' KV-cache default, imported here and not at the top: llama_cpp_peer.py imports this file for its
    parser under the peer's Python, which has llama.cpp but not this package."""
    from vllm_normswap.serve import CPU_KV_CACHE_GB

    return CPU_KV_CACHE_GB


SWEEP_BATCHES = (1, 2, 4, 8, 16, 32)


def step_bytes(cfg: dict, weight_bytes: float) -> float:
    """Bytes one decode step reads: every weight but the bf16 embedding table, of which it reads one row per token."""
    return weight_bytes - cfg["vocab_size"] * cfg["hidden_size"] * 2


def is_rate(key: str) -> bool:
    """The throughput figures (higher is better; the best over rounds is kept)."""
    return key.startswith("decode_tok_s_batch") or key == "prefill_tok_s_512"


def write_config(dst: Path, a) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden,
           "intermediate_size": a.ffn, "num_hidden_layers": a.layers, "num_attention_heads": a.hidden // 64,
           "num_key_value_heads": a.hidden // 64, "vocab_size": a.vocab, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
           "eos_token_id": 2, "rope_theta": 10000.0}
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return cfg


def param_count(cfg: dict) -> int:
    d, f, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    return n * (4 * d * d + 3 * d * f + 2 * d) + 2 * v * d + d


# ---------------- worker: one engine, one configuration ----------------

MODES = {  # configuration -> (--quantization, hf_overrides)
    "bf16": (None, None),
    "normswap_int8": ("normswap_int8", None),
    "normswap_int8_lm_head": ("normswap_int8", {"quantization_config": {"quant_method": "normswap_int8",
                                                                        "lm_head": True}}),
}


def make_llm(model: str, mode: str, eager: bool, max_num_seqs: int = 8):
    from vllm import LLM

    quant, overrides = MODES[mode]
    return LLM(model=model, load_format="dummy", dtype="bfloat16", quantization=quant, hf_overrides=overrides,
               enforce_eager=eager, skip_tokenizer_init=True, max_model_len=1024, enable_prefix_caching=False,
               seed=0, max_num_seqs=max_num_seqs,
               max_num_batched_tokens=512)  # caps the start-up profile run at 512 tokens


def worker(model: str, mode: str, eager: bool, decode_tokens: int, prefill_reps: int,
           batches: tuple[int, ...] = (1, 8)) -> dict:
    from vllm import SamplingParams

    from vllm_normswap.quant.footprint import weight_bytes

    llm = make_llm(model, mode, eager, max_num_seqs=max(8, *batches))
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]

    def gen(batch: int, prompt_len: int, max_tokens: int, salt: int) -> float:
        prompts = [{"prompt_token_ids": [(7 * i + 13 * j + salt) % (vocab - 10) + 5 for j in range(prompt_len)]}
                   for i in range(batch)]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t

    gen(1, 16, 4, 0)  # warm-up (first-call allocations)
    out = {"quantization": mode}
    for batch in batches:
        reps = 2 if batch == 1 else 1  # batch 1 is the noisiest figure and the cheapest to repeat
        t_full = min(gen(batch, 16, 1 + decode_tokens, 10 + r) for r in range(reps))
        t_pre = min(gen(batch, 16, 1, 20 + r) for r in range(reps))
        out[f"decode_tok_s_batch{batch}"] = batch * decode_tokens / (t_full - t_pre)
    t_prefill = min(gen(1, 512, 1, 30 + r) for r in range(prefill_reps))
    out["prefill_tok_s_512"] = 512 / t_prefill
    out["weight_bytes"] = llm.apply_model(weight_bytes)[0]
    return out


OP_KINDS = (  # (kind, substrings of torch.profiler keys), first match wins
    ("int8_gemv", ("_weight_int8pack_mm", "normswap::int8_linear")),
    ("bf16_gemm", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "onednn", "aten::bmm")),
    ("vllm_kernels", ("_C::", "_C_cpu::", "vllm::")),
)


def profile_worker(model: str, mode: str, eager: bool, decode_tokens: int) -> dict:
    """Batch-1 decode under torch.profiler in an in-process engine: where a step's wall time goes. vLLM applies
    VLLM_CPU_OMP_THREADS_BIND only to the worker processes it starts, so this one binds itself the same way (the
    caller sets OMP_NUM_THREADS): same thread count, hence the same kernel choice, as the timed runs."""
    os.sched_setaffinity(0, bind_cpus(os.environ["VLLM_CPU_OMP_THREADS_BIND"]))
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams

    llm = make_llm(model, mode, eager)
    prompt = [{"prompt_token_ids": [5 + (13 * j) % 1000 for j in range(16)]}]

    def gen(max_tokens: int) -> float:
        t = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t

    def profiled(max_tokens: int) -> tuple[float, dict]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = gen(max_tokens)
        return wall, {ev.key: (ev.self_cpu_time_total / 1e3, ev.count) for ev in prof.key_averages()}

    gen(4)
    t_pre = min(gen(1) for _ in range(2))
    plain_step = (gen(1 + decode_tokens) - t_pre) / decode_tokens
    # the decode steps only: a profiled prefill-only request is subtracted op by op (the 16-token prefill is one
    # M=16 step, which would otherwise weigh in as much as a dozen decode steps)
    wall_pre, ops_pre = profiled(1)
    wall, ops = profiled(1 + decode_tokens)
    steps = decode_tokens
    kinds = {kind: 0.0 for kind, _ in OP_KINDS} | {"other_ops": 0.0}
    calls = 0
    top = []
    for key, (ms, n) in ops.items():
        ms_pre, n_pre = ops_pre.get(key, (0.0, 0))
        kind = next((k for k, subs in OP_KINDS if any(sub in key for sub in subs)), "other_ops")
        kinds[kind] += ms - ms_pre
        calls += n - n_pre
        top.append((ms - ms_pre, key, n - n_pre))
    per_step = {k: v / steps for k, v in kinds.items()}
    in_ops = sum(per_step.values())
    step_profiled = (wall - wall_pre) / steps * 1e3
    return {"quantization": mode, "threads": torch.get_num_threads(),
            "step_ms_unprofiled": plain_step * 1e3, "step_ms_profiled": step_profiled,
            "in_ops_ms": per_step, "outside_ops_ms": step_profiled - in_ops, "op_calls_per_step": calls / steps,
            "top_ops_ms_per_step": [(key, round(ms / steps, 3), n // steps) for ms, key, n in sorted(top)[::-1][:12]]}


# ---------------- kernels timed standalone (same shapes, same kernels as inside vLLM) ----------------

def vllm_bf16_linear(n: int, k: int):
    """vLLM's own CPU bf16 linear for one random [n, k] weight, set up as its UnquantizedLinearMethod does."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(n, k).to(torch.bfloat16) * 0.02, requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return lambda x: layer.cpu_linear(x, layer.weight, None)


def kernel_ms(cfg: dict, quant: bool, int8_head: bool = False, reps: int = 20) -> dict:
    """Each kernel at M=1 on its own, cycling through copies of its weight that together exceed the L3 cache (in
    the engine every weight comes from memory: a single copy would sit in L3 and flatter the small layers)."""
    import torch

    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {"qkv": (3 * d, d), "o": (d, d), "gate_up": (2 * f, d), "down": (d, f)}

    def timed(fns) -> float:
        for fn in fns:
            fn()
        t = time.perf_counter()
        for i in range(reps):
            fns[i % len(fns)]()
        return (time.perf_counter() - t) / reps * 1e3

    def int8_linear(n: int, k: int):
        from vllm_normswap.quant.cpu_op import apply_int8_linear
        from vllm_normswap.quant.primitives import quantize

        q, s = quantize(torch.randn(n, k).to(torch.bfloat16) * 0.02, "channel")
        return lambda x: apply_int8_linear(x, q, s, None)

    def kernels(make, n: int, k: int, bytes_per_weight: int):
        x = torch.randn(1, k).to(torch.bfloat16)
        from vllm_normswap.cpuinfo import cycle_bytes

        copies = max(2, -(-cycle_bytes() // (n * k * bytes_per_weight)))  # each call's weight from memory
        return [functools.partial(fn, x) for fn in [make(n, k) for _ in range(copies)]]

    per_layer = {}
    for name, (n, k) in shapes.items():
        per_layer[name] = timed(kernels(int8_linear, n, k, 1) if quant else kernels(vllm_bf16_linear, n, k, 2))
    head = kernels(int8_linear, v, d, 1) if int8_head else kernels(vllm_bf16_linear, v, d, 2)
    return {"linear_per_layer_ms": per_layer, "linears_ms": cfg["num_hidden_layers"] * sum(per_layer.values()),
            "lm_head_ms": timed(head)}


def run_worker(cmd: list[str], env: dict | None = None) -> dict | None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_JSON ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        return None
    return json.loads(lines[-1].removeprefix("BENCH_JSON "))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=44032)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prefill-reps", type=int, default=1, help="512-token prefills timed (best of)")
    ap.add_argument("--compiled", action="store_true",
                    help="vLLM's default CPU torch.compile (default here: enforce_eager, for a bounded run time)")
    ap.add_argument("--threads-bind", default=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "all"),
                    help="VLLM_CPU_OMP_THREADS_BIND for the worker; 'all' = every core (vLLM's 'auto' keeps one "
                         "core for the scheduler, i.e. 1 thread on a 2-core box)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the configurations this many times, alternating, and keep each one's best figures "
                         "(a shared or busy machine drifts by 10-20%% between runs)")
    ap.add_argument("--lm-head", action="store_true",
                    help="also run normswap_int8 with lm_head: true (the LM head in int8 too)")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the in-process torch.profiler run of batch-1 decode")
    ap.add_argument("--batches", default="1,8", help="decode batch sizes, comma-separated")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: skip the CPU-only parts (thread binding, kernel breakdown, profile, core bandwidth)")
    ap.add_argument("--sweep", action="store_true",
                    help="the whole table: decode at batch 1-32 and prefill, bf16 vs int8 vs llama.cpp Q8_0, at each "
                         "of --sweep-threads worker threads (one engine per configuration and thread count)")
    ap.add_argument("--sweep-threads", default="1,2", help="worker thread counts of --sweep (threads bound to "
                                                           "cores 0..N-1)")
    ap.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON", ""),
                    help="a Python with llama-cpp-python and gguf (the 'bench' extra) for --sweep's llama.cpp "
                         "column; default: this one if it has them, else the column is left out with a note")
    ap.add_argument("--save", help="also write the table as a result file for benchmarks/README.md")
    ap.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    return ap


def main() -> int:
    ap = parser()
    a = ap.parse_args()
    batches = tuple(int(b) for b in a.batches.split(","))
    if 1 not in batches:
        ap.error("--batches must include 1 (the roofline and the breakdown are batch-1 figures)")
    if a.worker and a.profile_worker:
        res = profile_worker(a.model, a.worker, a.eager, a.decode_tokens)
        print("BENCH_JSON " + json.dumps(res), flush=True)
        return 0
    if a.worker:
        res = worker(a.model, a.worker, a.eager, a.decode_tokens, a.prefill_reps, batches)
        print("BENCH_JSON " + json.dumps(res), flush=True)
        return 0

    if a.sweep:
        if a.device != "cpu":
            ap.error("--sweep is a CPU table (thread counts, llama.cpp)")
        return sweep(a)

    import torch

    cpu = a.device == "cpu"
    if not cpu and a.lm_head:
        ap.error("--lm-head: the int8 LM head is implemented on CPU only")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model(weight_bytes) in the worker
    bind, threads = None, None
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", kv_cache_gb())
        bind = f"0-{os.cpu_count() - 1}" if a.threads_bind == "all" else a.threads_bind
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        # the standalone kernel timings of the breakdown use as many threads as the vLLM worker gets
        threads = len(bind_cpus(bind))
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_config(Path(tmp) / "model", a)
        runs, profiles = {}, {}
        modes = ("bf16", "normswap_int8") + (("normswap_int8_lm_head",) if a.lm_head else ())
        for rnd in range(a.rounds):  # configurations alternate; each figure is the best over the rounds
            for mode in modes:
                cmd = [sys.executable, __file__, "--worker", mode, "--model", str(Path(tmp) / "model"),
                       "--decode-tokens", str(a.decode_tokens), "--prefill-reps", str(a.prefill_reps),
                       "--batches", a.batches] + (
                          [] if a.compiled else ["--eager"])
                r = run_worker(cmd)
                if r is None:
                    return 1
                print(f"round {rnd + 1}/{a.rounds} {mode}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in r.items() if is_rate(k)),
                    file=sys.stderr, flush=True)
                runs[mode] = r if mode not in runs else {
                    k: max(v, runs[mode][k]) if is_rate(k) else v
                    for k, v in r.items()}
                if a.profile and cpu and rnd == 0:
                    profiles[mode] = run_worker(cmd + ["--profile-worker"], {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                                                                             "OMP_NUM_THREADS": str(threads)})
                    if profiles[mode] is None:
                        return 1

    bw = read_bw(threads) if cpu else gpu_read_bw()
    result = {"model": {"params": param_count(cfg), **{k: cfg[k] for k in (
        "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")}},
        "device": a.device, "batches": list(batches), "threads_bind": bind, "compiled": a.compiled,
        "rounds": a.rounds, "read_bw_GBps": bw / 1e9}
    if cpu:
        core_bw = read_bw(1)
        result["core_read_bw_GBps"] = core_bw / 1e9
    for mode, r in runs.items():
        r["bytes_per_decode_step"] = step = step_bytes(cfg, r["weight_bytes"])
        r["roofline_tok_s_batch1"] = bw / step
        r["roofline_fraction_batch1"] = r["decode_tok_s_batch1"] / r["roofline_tok_s_batch1"]
        if cpu:
            r["core_roofline_tok_s_batch1"] = core_bw / step  # one core's bandwidth (the default: 1 thread)
            r["core_roofline_fraction_batch1"] = r["decode_tok_s_batch1"] / r["core_roofline_tok_s_batch1"]
        result[mode] = r
        if not cpu:
            continue
        k = kernel_ms(cfg, quant=mode != "bf16", int8_head=mode == "normswap_int8_lm_head")
        step_ms = 1e3 / r["decode_tok_s_batch1"]
        r["batch1_breakdown_ms"] = {"step": step_ms, "linear_layers": k["linears_ms"], "lm_head": k["lm_head_ms"],
                                    "other": step_ms - k["linears_ms"] - k["lm_head_ms"],
                                    "linear_per_layer": k["linear_per_layer_ms"]}
        if mode in profiles:
            r["batch1_profile"] = profiles[mode]
    b = runs["bf16"]
    for mode, key in (("normswap_int8", "int8_over_bf16"), ("normswap_int8_lm_head", "int8_lm_head_over_bf16")):
        if mode in runs:
            q = runs[mode]
            result[key] = {**{f"decode_batch{n}": q[f"decode_tok_s_batch{n}"] / b[f"decode_tok_s_batch{n}"]
                              for n in batches},
                           "prefill_512": q["prefill_tok_s_512"] / b["prefill_tok_s_512"],
                           "weight_bytes": q["weight_bytes"] / b["weight_bytes"],
                           # where both read at the memory's speed (batch 1), the most int8 can gain: the ratio of
                           # the bytes a step reads; vLLM's per-step overhead, the same for both, lowers it further
                           "decode_batch1_ceiling": b["bytes_per_decode_step"] / q["bytes_per_decode_step"]}
    if cpu:
        result["goals"] = {"decode_batch1_ratio": 1.8, "prefill_ratio": 0.9, "weight_bytes_ratio": 0.5,
                           "llama_cpp_q8_0_decode_tok_s_batch1": "25-27 (0.95B, same box, from environment notes)"}
    print(json.dumps(result, indent=2))
    if a.save:
        Path(a.save).write_text(json.dumps(e2e_table(result, cpu_info() if cpu else None), indent=2) + "\n")
    return 0


# ---------------- --sweep: batch sizes x threads x bf16 / int8 / llama.cpp ----------------


SWEEP_MEASURES = tuple(f"decode_tok_s_batch{b}" for b in SWEEP_BATCHES) + ("prefill_tok_s_512",)
# int8 as served by default (LM head bf16), and with `lm_head: true`: llama.cpp's Q8_0 file quantizes its head too,
# so that row is the like-for-like one against the peer
SWEEP_INT8 = {"normswap_int8": "int8", "normswap_int8_lm_head": "int8 + int8 head"}


def sweep(a) -> int:
    threads = [int(t) for t in a.sweep_threads.split(",")]
    info = cpu_info()
    if max(threads) > info["cores"]:
        raise SystemExit(f"--sweep-threads {a.sweep_threads}: this machine has {info['cores']} cores")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", kv_cache_gb())
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model(weight_bytes) in the worker
    runs: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = write_config(Path(tmp) / "model", a)
        for t in threads:
            env = {"VLLM_CPU_OMP_THREADS_BIND": "0" if t == 1 else f"0-{t - 1}"}
            runs[t] = {}
            for rnd in range(a.rounds):  # the configurations alternate; each figure is the best over the rounds
                for mode in ("bf16", *SWEEP_INT8):
                    cmd = [sys.executable, __file__, "--worker", mode, "--model", str(Path(tmp) / "model"),
                           "--decode-tokens", str(a.decode_tokens), "--prefill-reps", str(a.prefill_reps),
                           "--batches", ",".join(map(str, SWEEP_BATCHES))] + ([] if a.compiled else ["--eager"])
                    r = run_worker(cmd, env)
                    if r is None:
                        return 1
                    print(f"{t} thread(s), round {rnd + 1}/{a.rounds}, {mode}: " + ", ".join(
                        f"{k.removeprefix('decode_tok_s_')} {r[k]:.2f}" for k in SWEEP_MEASURES),
                        file=sys.stderr, flush=True)
                    best = runs[t].get(mode)
                    runs[t][mode] = r if best is None else {k: max(v, best[k]) if is_rate(k) else v
                                                            for k, v in r.items()}
    peer, peer_note = run_peer(a, threads, SWEEP_BATCHES)
    plans = {t: int8_plans(cfg, t) for t in threads}
    table = []
    for t in threads:
        b = runs[t]["bf16"]
        for m in SWEEP_MEASURES:
            row = {"threads": t, "measure": m.removeprefix("decode_tok_s_").replace("_tok_s_", " "),
                   "bf16_tok_s": b[m]}
            lc = (peer or {}).get(t, {}).get(m)
            if lc:
                row["llama_cpp_tok_s"] = lc
            for mode, label in SWEEP_INT8.items():
                q = runs[t][mode][m]
                row[label] = {"tok_s": q, "over_bf16": q / b[m]} | ({"over_llama_cpp": q / lc} if lc else {})
            table.append(row)
    goals = {"int8_over_bf16_min": 1.0, "int8_over_bf16_batch1_min": 1.8, "int8_over_llama_cpp_min": 1.0}
    bf16_bytes = runs[threads[0]]["bf16"]["weight_bytes"]
    result = {"benchmark": "bench_int8.py --sweep", "cpu": info, "model": {"params": param_count(cfg), **cfg},
              "compiled": a.compiled, "rounds": a.rounds, "decode_tokens": a.decode_tokens, "peer": peer_note,
              "date": time.strftime("%Y-%m-%d"), "table": table, "goals": goals, "int8_plan": plans,
              "weight_ratio": {label: runs[threads[0]][mode]["weight_bytes"] / bf16_bytes
                               for mode, label in SWEEP_INT8.items()},
              # where both read at the memory's speed (batch 1), int8 gains at most the ratio of the bytes a
              # decode step reads
              "batch1_ceiling": {label: step_bytes(cfg, bf16_bytes)
                                 / step_bytes(cfg, runs[threads[0]][mode]["weight_bytes"])
                                 for mode, label in SWEEP_INT8.items()}}
    print(json.dumps(result, indent=2))
    if a.save:
        Path(a.save).write_text(json.dumps(readme_table(result), indent=2) + "\n")
    return 0


def int8_plans(cfg: dict, threads: int) -> list[dict]:
    """The int8 kernel plan the workers used at this thread count (what `normswap int8-plan --model` prints), read
    from the plan cache they wrote: per linear shape, the path per row-count bucket and the medians it was chosen
    on. A shape missing from the cache (the workers' threads differed, or NORMSWAP_INT8_KERNEL forced a path) is
    listed without a plan."""
    import torch

    from vllm_normswap.quant import cpu_plan
    from vllm_normswap.quant.plan_cmd import model_shapes

    rows = []
    for name, (n, k) in model_shapes(cfg, lm_head=True).items():
        plan = cpu_plan.cached_plan(n, k, 1, torch.bfloat16, threads)
        rows.append({"layer": name, "n": n, "k": k, **({"buckets": dict(zip(cpu_plan.BUCKETS, plan.kernels)),
                                                          "ms": plan.ms} if plan else {"buckets": None})})
    return rows


if __name__ == "__main__":
    sys.exit(main())
