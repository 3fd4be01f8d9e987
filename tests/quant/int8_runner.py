"""Run several vLLM configurations of tiny checkpoints one after another in ONE fresh process (one engine start
each, no interpreter/vLLM re-import per run) and save, per run, the full-vocabulary prompt log-probabilities,
greedy continuations and (optionally) the int8 weights + scales of every normswap_int8 layer.

    python tests/quant/int8_runner.py SPECS_JSON OUT.pt
SPECS: [{"model": dir, "prompts": [[ids]], "quantization": null | "normswap_int8", "hf_overrides": {...},
         "tp": 1, "max_tokens": 8, "dump_int8": false}, ...]
"""

import gc
import json
import os
import sys


if __name__ == "__main__":
    specs = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model ships int8_state to the workers
    import torch
    from vllm import LLM, SamplingParams

    from vllm_normswap.quant.inspect import int8_state

    results = []
    for spec in specs:
        vocab = json.load(open(os.path.join(spec["model"], "config.json")))["vocab_size"]
        llm = LLM(model=spec["model"], enforce_eager=spec.get("enforce_eager", True), dtype="bfloat16",
                  tensor_parallel_size=spec.get("tp", 1), max_model_len=512, seed=0,
                  quantization=spec.get("quantization"), hf_overrides=spec.get("hf_overrides") or None,
                  max_logprobs=vocab)
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
            result["greedy"].append(list(out.outputs[0].token_ids))
        if spec.get("dump_int8"):
            result["int8"] = llm.apply_model(int8_state)  # one entry per TP rank
        results.append(result)
        del llm
        gc.collect()
    torch.save(results, sys.argv[2])
    print("RUNNER_DONE", flush=True)
