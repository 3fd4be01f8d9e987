"""Throughput with the activation observer on vs off, in one run; prints JSON.

    flock /tmp/vllm.lock python benchmarks/bench_observer.py [--option rms-swiglu] [--eager] [--hidden 1024 ...]

Each setting runs in a fresh process (one vLLM engine per process) on the same random checkpoint
(``normswap init``-style, bf16). Prefill: N prompts of P tokens, max_tokens=1. Decode: B prompts of 16 tokens,
decode tok/s = B*T / (t(max_tokens=T+1) - t(max_tokens=1)). Best of --reps; the settings alternate
(off, on, off, on, ...) so drift on a shared machine hits both. Goal: on/off >= 0.97 for both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from vllm_normswap.serve import CPU_KV_CACHE_GB

GOAL = 0.97


def worker(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], enforce_eager=spec["eager"], dtype="bfloat16", max_model_len=1024,
              hf_overrides=spec["hf_overrides"], seed=0, max_num_seqs=max(spec["batch"], spec["prefill_n"]),
              max_num_batched_tokens=max(2048, spec["prefill_n"] * spec["prefill_len"]))
    vocab = 512

    def prompts(n, length, salt):  # distinct ids per call: the prefix cache must not skip prefill work
        return [{"prompt_token_ids": [1 + (salt * 7919 + i * 131 + j * 17) % (vocab - 1) for j in range(length)]}
                for i in range(n)]

    def timed(batch, params):
        t = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - t

    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    many = SamplingParams(max_tokens=spec["decode_tokens"] + 1, temperature=0.0, ignore_eos=True)
    timed(prompts(2, 16, 0), many)  # warm-up
    prefill, decode, salt = [], [], 1
    for _ in range(spec["reps"]):
        t = timed(prompts(spec["prefill_n"], spec["prefill_len"], salt), one)
        prefill.append(spec["prefill_n"] * spec["prefill_len"] / t)
        t1 = timed(prompts(spec["batch"], 16, salt + 1), one)
        tn = timed(prompts(spec["batch"], 16, salt + 2), many)
        decode.append(spec["batch"] * spec["decode_tokens"] / max(tn - t1, 1e-9))
        salt += 3
    return {"prefill_tok_s": max(prefill), "decode_tok_s": max(decode)}


def run_setting(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env={"VLLM_CPU_KVCACHE_SPACE": CPU_KV_CACHE_GB, **os.environ})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_JSON ")]
    if proc.returncode or not lines:
        raise SystemExit(f"benchmark worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("BENCH_JSON "))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--option", default="rms-swiglu")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compiled mode)")
    p.add_argument("--batch", type=int, default=8, help="decode batch")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--prefill-n", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternating off/on process pairs")
    p.add_argument("--thresholds", type=float, nargs="+", default=[3.0, 6.0, 20.0])
    return p


def main():
    args = parser().parse_args()
    if args.worker:
        print("BENCH_JSON " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    import torch

    from vllm_normswap.checkpoints.random_init import make_arch, write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        arch = make_arch(args.option, hidden_size=args.hidden, layers=args.layers, heads=args.hidden // 64,
                         max_positions=1024)
        write_random_checkpoint(tmp, arch, seed=0)
        base = dict(model=tmp, eager=args.eager, batch=args.batch, decode_tokens=args.decode_tokens,
                    prefill_n=args.prefill_n, prefill_len=args.prefill_len, reps=args.reps)
        settings = {"off": {}, "on": {"normswap_observe": {"thresholds": args.thresholds}}}
        results = {name: [] for name in settings}
        for _ in range(args.rounds):
            for name, overrides in settings.items():
                results[name].append(run_setting({**base, "hf_overrides": overrides}))
    best = {name: {k: max(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    ratio = {k: best["on"][k] / best["off"][k] for k in best["off"]}
    print(json.dumps({
        "benchmark": "observer_on_vs_off", "option": args.option, "hidden": args.hidden, "layers": args.layers,
        "mode": "eager" if args.eager else "compiled", "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": os.cpu_count(),
        "decode_batch": args.batch, "prefill_tokens": args.prefill_n * args.prefill_len,
        "thresholds": args.thresholds, "off": best["off"], "on": best["on"],
        "on_over_off": {k: round(v, 4) for k, v in ratio.items()}, "goal": GOAL,
        "meets_goal": all(v >= GOAL for v in ratio.values()), "runs": results}, indent=1))


if __name__ == "__main__":
    main()
