"""normswap_int8 on NormSwapForCausalLM, every option of the registry (the `checkpoints` fixture: random, non-zero
biases): per-channel int8 prompt log-probabilities vs bf16 of the same model, full-vocabulary mean KL < 0.01 nats/token,
and every linear layer of the model quantized. One runner process, two engine starts per option."""

from __future__ import annotations

import pytest

from quant.test_int8_vllm import KL_MAX, mean_kl, prompts, run_int8
from vllm_normswap.registry import OPTIONS


@pytest.fixture(scope="module")
def option_runs(checkpoints, tmp_path_factory):
    p = prompts()
    specs = []
    for option in OPTIONS:
        specs.append({"model": str(checkpoints[option]), "prompts": p})
        specs.append({"model": str(checkpoints[option]), "prompts": p, "quantization": "normswap_int8",
                      "dump_int8": True})
    results, _ = run_int8(specs, tmp_path_factory.mktemp("options") / "runs.pt")
    return {option: (results[2 * i], results[2 * i + 1]) for i, option in enumerate(OPTIONS)}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_kl_int8_vs_bf16(option_runs, option):
    bf16, int8 = option_runs[option]
    kl = mean_kl(bf16["prompt_logprobs"], int8["prompt_logprobs"])
    state = int8["int8"][0]
    print(f"{option}: mean KL(bf16 || int8 per-channel) = {kl:.2e} nats/token, "
          f"{state['int8_layers']}/{state['linear_layers']} linear layers int8")
    assert state["int8_layers"] == state["linear_layers"] == 8  # 2 layers x (qkv, o, up|gate_up, down)
    assert kl < KL_MAX
