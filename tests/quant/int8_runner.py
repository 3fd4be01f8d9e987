"""Run several vLLM configurations of tiny checkpoints one after another in ONE fresh process (one engine start
each, no interpreter/vLLM re-import per run) and save, per run, the full-vocabulary prompt log-probabilities,
greedy continuations (each prompt alone: reproducible batches) with their top-2 logprobs, and (optionally) the int8
weights + scales of every normswap_int8 layer.

    python tests/quant/int8_runner.py SPECS_JSON OUT.pt
SPECS: [{"model": dir, "prompts": [[ids]], "quantization": null | "normswap_int8", "hf_overrides": {...},
         "tp": 1, "max_tokens": 8, "dump_int8": false, "expect_failure": false}, ...]
A run with expect_failure must fail while loading; its error is printed to stderr (vLLM logs the root cause of
an engine start failure there) and the runner goes on with the next run.
"""

import functools
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: vllm_offline


if __name__ == "__main__":
    specs = json.loads(sys.argv[1])
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model ships save_int8_state to the workers
    from vllm_offline import in_process

    # engines in this process where possible: two fewer processes that import torch and vLLM per engine start
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if in_process(specs) else "1")
    import torch
    from vllm import LLM, SamplingParams

    from vllm_normswap.quant.footprint import save_int8_state

    results = []
    for spec in specs:
        vocab = json.load(open(os.path.join(spec["model"], "config.json")))["vocab_size"]
        try:
            llm = LLM(model=spec["model"], enforce_eager=spec.get("enforce_eager", True), dtype="bfloat16",
                      tensor_parallel_size=spec.get("tp", 1), max_model_len=512, seed=0,
                      quantization=spec.get("quantization"), hf_overrides=spec.get("hf_overrides") or None,
                      max_logprobs=vocab)
        except Exception as err:  # noqa: BLE001  (a misconfiguration run: the test reads stderr for the cause)
            if not spec.get("expect_failure"):
                raise
            print(f"RUN_FAILED {spec['model']}: {err}", file=sys.stderr, flush=True)
            results.append({"failed": str(err)})
            continue
        if spec.get("expect_failure"):
            raise SystemExit(f"run {spec} was expected to fail at load but loaded")
        params = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0, prompt_logprobs=vocab,
                                ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in spec["prompts"]], params, use_tqdm=False)
        result = {"prompt_logprobs": [], "greedy": []}
        for out in outs:
            rows = []
            for entry in out.prompt_logprobs[1:]:  # position t >= 1: distribution that predicted token t
                row = torch.full((vocab,), float("-inf"), dtype=torch.float64)
                for tok, lp in entry.items():
                    row[tok] = lp.logprob
                rows.append(row)
            result["prompt_logprobs"].append(torch.stack(rows))
        # greedy text one prompt at a time: in a batch, which requests share a step depends on when the engine
        # process receives them, and a row's rounding depends on the kernel its batch size picks (M = 1: GEMV)
        greedy = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0, ignore_eos=True, logprobs=2)
        result["greedy_top2"] = []  # per step: the two largest logprobs (how close the greedy choice was)
        for ids in spec["prompts"]:
            out = llm.generate([{"prompt_token_ids": ids}], greedy, use_tqdm=False)[0].outputs[0]
            result["greedy"].append(list(out.token_ids))
            result["greedy_top2"].append([sorted((lp.logprob for lp in step.values()), reverse=True)[:2]
                                          for step in out.logprobs])
        if spec.get("dump_int8"):
            files = llm.apply_model(functools.partial(save_int8_state, path=f"{sys.argv[2]}.{len(results)}"))
            result["int8"] = [torch.load(f, weights_only=True) for f in sorted(files)]  # one per TP rank
        results.append(result)
        llm.llm_engine.engine_core.shutdown()  # stop the engine process now, not at interpreter teardown
        del llm
        gc.collect()
    torch.save(results, sys.argv[2])
    print("RUNNER_DONE", flush=True)
    sys.stderr.flush()
    os._exit(0)  # skip the teardown vLLM 0.32's CPU engine sometimes aborts in (tests/vllm_offline.py)
