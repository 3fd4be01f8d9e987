"""vLLM's NormSwapForCausalLM vs the pure-torch reference, for all four options, eager and compiled.

Tolerances (bf16 in vLLM vs fp32 reference on the same bf16-rounded weights; measured max |diff| on these tiny
models is printed by each test): prompt logprobs within LOGPROB_ATOL nats per token, mean within LOGPROB_MEAN_ATOL;
greedy continuations agree at every step where the reference's top-1/top-2 logit margin exceeds MARGIN. The
reference is teacher-forced on vLLM's own continuation (one forward over prompt + 32 generated tokens), so every
step is checked in the context vLLM actually saw; at least half of the steps must clear the margin.

All eight engines (options x modes) run one after another in one offline-runner process (one vLLM import).
"""

from __future__ import annotations

import pytest
import torch

from utils import random_prompts, run_vllm_offline
from vllm_normswap.checkpoints.files import load_reference
from vllm_normswap.registry import OPTIONS

LOGPROB_ATOL = 0.1
LOGPROB_MEAN_ATOL = 0.02
MARGIN = 0.05
N_GREEDY = 32
MODES = ("eager", "compiled")
PROMPTS = random_prompts(4, seed=0, lengths=(8, 48))


def check_against_reference(ckpt, result, prompt_ids):
    ref = load_reference(ckpt)
    diffs = []
    for ids, got in zip(prompt_ids, result["prompt_logprobs"]):
        want = ref.prompt_logprobs(ids)
        diffs += [abs(a - b) for a, b in zip(got, want)]
    diffs_t = torch.tensor(diffs)
    print(f"prompt logprobs: max |diff| {diffs_t.max():.4f}, mean {diffs_t.mean():.4f} over {len(diffs)} tokens")
    assert diffs_t.max() < LOGPROB_ATOL and diffs_t.mean() < LOGPROB_MEAN_ATOL
    compared = total = 0
    for ids, got in zip(prompt_ids, result["greedy"]):
        logits = ref.forward(torch.tensor(ids + got))[len(ids) - 1: -1]  # the logits that chose each new token
        top = logits.topk(2, dim=-1)
        for step, (g, w, m) in enumerate(zip(got, top.indices[:, 0].tolist(),
                                             (top.values[:, 0] - top.values[:, 1]).tolist())):
            total += 1
            if m > MARGIN:
                assert g == w, f"greedy step {step}: vLLM chose {g}, reference argmax {w} (margin {m:.3f})"
                compared += 1
    print(f"greedy: {compared}/{total} steps had reference margin > {MARGIN} and agreed")
    assert compared >= total / 2


@pytest.fixture(scope="module")
def vllm_runs(checkpoints):
    runs = [(option, mode) for option in OPTIONS for mode in MODES]
    results = run_vllm_offline([{"model": str(checkpoints[option]), "prompts": PROMPTS, "max_tokens": N_GREEDY,
                                 "enforce_eager": mode == "eager"} for option, mode in runs])
    return dict(zip(runs, results))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_vllm_matches_reference(checkpoints, vllm_runs, option, mode):
    check_against_reference(checkpoints[option], vllm_runs[(option, mode)], PROMPTS)
