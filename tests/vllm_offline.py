"""Run checkpoints in vLLM's offline engine in a fresh process and print JSON: prompt logprobs and greedy
continuations for given token-id prompts. Tests call it as a subprocess through ``utils.run_vllm_offline`` (one
engine at a time; a TP run spawns worker processes, hence the __main__ guard).

    python tests/vllm_offline.py SPECS_JSON  ->  stdout line 'RESULT_JSON [{...}, ...]', one result per spec:
        {"prompt_logprobs": [[...]], "greedy": [[...]]}
SPECS: one SPEC or a list of them, run one after another (one engine each, one vLLM import for all):
SPEC: {"model": dir, "prompts": [[ids]], "max_tokens": 32, "enforce_eager": true, "tp": 1, "dtype": "bfloat16",
       "quantization": null, "hf_overrides": {}, "max_model_len": 512, "gated_acts": {}}
"gated_acts" adds {activation: gate function} to registry.GATED_ACTS first, as an edit of registry.py would: a new
gated activation (tests/test_add_option.py). The engine must then run in this process (see in_process).
"""

import gc
import json
import os
import sys


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    if spec.get("gated_acts"):
        from vllm_normswap import registry

        assert in_process([spec]), "gated_acts reach only an engine in this process (tp 1, no Numba)"
        registry.GATED_ACTS.update(spec["gated_acts"])
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


def in_process(specs: list[dict]) -> bool:
    """Engines in this process unless a spec needs vLLM's worker processes: tensor parallelism does. (Nothing on
    the engine's path may load Numba: once llvmlite is loaded, vLLM 0.32's CPU worker cannot start in the
    process, as triton_utils/dispatcher.py calls vars(x).get on every module global and llvmlite's
    _lib_fn_wrapper breaks it.)"""
    return all(spec.get("tp", 1) == 1 for spec in specs)


if __name__ == "__main__":
    specs = json.loads(sys.argv[1])
    specs = specs if isinstance(specs, list) else [specs]  # the output is a list either way
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
