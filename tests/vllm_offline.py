"""Run checkpoints in vLLM's offline engine in a fresh process and print JSON: prompt logprobs and greedy
continuations for given token-id prompts. Tests call it as a subprocess through ``utils.run_vllm_offline`` (one
engine at a time; a TP run spawns worker processes, hence the __main__ guard).

    python tests/vllm_offline.py SPECS_JSON  ->  stdout line 'RESULT_JSON [{...}, ...]', one result per spec:
        {"prompt_logprobs": [[...]], "greedy": [[...]]}
SPECS: one SPEC or a list of them, run one after another (one engine each, one vLLM import for all):
SPEC: {"model": dir, "prompts": [[ids]], "max_tokens": 32, "enforce_eager": true, "tp": 1, "dtype": "bfloat16",
       "quantization": null, "hf_overrides": {}, "max_model_len": 512}
"""

import gc
import json
import os
import sys
from pathlib import Path


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], enforce_eager=spec.get("enforce_eager", True), dtype=spec.get("dtype", "bfloat16"),
              tensor_parallel_size=spec.get("tp", 1), max_model_len=spec.get("max_model_len", 512),
              quantization=spec.get("quantization"), hf_overrides=spec.get("hf_overrides") or None, seed=0)
    params = SamplingParams(max_tokens=spec.get("max_tokens", 32), temperature=0.0, prompt_logprobs=0,
                            ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params, use_tqdm=False)
    result = {"prompt_logprobs": [], "greedy": []}
    for ids, out in zip(spec["prompts"], outs):
        # entry t (t >= 1) holds {token_id: Logprob} for the actual prompt token t (plus top-k, k = 0 here)
        result["prompt_logprobs"].append([lp[tok].logprob for tok, lp in zip(ids[1:], out.prompt_logprobs[1:])])
        result["greedy"].append(list(out.outputs[0].token_ids))
    # stop the engine now: an engine process holds our stdout and stderr pipes (an orphan would keep the caller
    # waiting); in this process, it frees the model before the next run
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def _int8(spec: dict) -> bool:
    if spec.get("quantization") or "quantization_config" in (spec.get("hf_overrides") or {}):
        return True
    cfg = Path(spec["model"]) / "config.json"
    return cfg.is_file() and "quantization_config" in json.loads(cfg.read_text())


def in_process(specs: list[dict]) -> bool:
    """Engines in this process unless a spec needs vLLM's worker processes: tensor parallelism does, and so does
    any run that may load Numba. Once llvmlite is loaded, vLLM 0.32's CPU worker cannot start in the process
    (triton_utils/dispatcher.py calls vars(x).get on every module global; llvmlite's _lib_fn_wrapper breaks it),
    and int8 loads Numba only where the compiled kernel is unavailable."""
    if any(spec.get("tp", 1) != 1 for spec in specs):
        return False
    if not any(_int8(spec) for spec in specs):
        return True
    from vllm_normswap.quant import cpp_kernel

    return os.environ.get("NORMSWAP_INT8_KERNEL", "auto") != "numba" and cpp_kernel.loaded() is not None


if __name__ == "__main__":
    specs = json.loads(sys.argv[1])
    specs = specs if isinstance(specs, list) else [specs]  # the output is a list either way
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Engines in this process: with VLLM_ENABLE_V1_MULTIPROCESSING=0 vLLM's CPU platform runs EngineCore and
    # the worker here ("uni" executor) instead of spawning two processes that each import torch and vLLM again,
    # which is most of a tiny model's start-up. Tensor parallelism needs the worker processes (see in_process).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if in_process(specs) else "1")
    results = [run(spec) for spec in specs]
    print("RESULT_JSON " + json.dumps(results), flush=True)
    # vLLM 0.32's CPU engine sometimes aborts while the interpreter tears down ("terminate called without an
    # active exception", SIGABRT) after all the work is done: leave without the teardown.
    sys.stderr.flush()
    os._exit(0)
