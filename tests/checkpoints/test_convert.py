"""HF GPT-2 / OPT / Llama -> `normswap convert` -> pure-torch reference (fp32) and vLLM (bf16), against the HF model.

Tolerances: fp32 reference vs HF fp32 logits: max |diff| < 1e-3 (float reordering only). vLLM bf16 prompt
logprobs vs HF fp32 on the same bf16-rounded weights: max |diff| < 0.1 nats, mean < 0.03 (bf16 activations; measured max 0.05-0.065, mean 0.016-0.021). --to-rmsnorm: converted
fp32 logits vs original within 1e-3; norm_in token means |mu| < 1e-4 after (vs > 0.5 before, by construction).
"""

from __future__ import annotations

import pytest
import torch

from hf_models import VOCAB, build, hf_logits
from vllm_normswap.checkpoints.convert import convert
from vllm_normswap.checkpoints.files import load_reference
from utils import random_prompts, run_vllm_offline, shared_tokenizer
from vllm_normswap.registry import ConfigError

KINDS = ["gpt2", "opt", "llama"]


def prompts(n=3, seed=0):
    return random_prompts(n, seed, vocab=VOCAB, lengths=(8, 40))


def save_hf(kind, path, tokenizer):
    from vllm_normswap.checkpoints.tokenizer import save_hf_tokenizer

    model = build(kind)
    model.save_pretrained(str(path), safe_serialization=True)
    save_hf_tokenizer(tokenizer, path)
    return model


@pytest.fixture(scope="module")
def tok():
    return shared_tokenizer()


@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_hf_fp32(kind, tmp_path, tok):
    model = save_hf(kind, tmp_path / "hf", tok)
    convert(tmp_path / "hf", tmp_path / "ns", dtype="float32")
    ref = load_reference(tmp_path / "ns")
    for ids in prompts():
        diff = (ref(torch.tensor(ids)) - hf_logits(model, ids)).abs().max().item()
        assert diff < 1e-3, f"{kind}: reference vs HF max |logit diff| {diff}"


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
def test_to_rmsnorm_exact_and_centered(kind, tmp_path, tok):
    model = save_hf(kind, tmp_path / "hf", tok)
    convert(tmp_path / "hf", tmp_path / "ln", dtype="float32")
    arch = convert(tmp_path / "hf", tmp_path / "rms", to_rmsnorm=True, dtype="float32")
    assert (arch.norm_type, arch.attn_norm_type, arch.final_norm_type) == ("rmsnorm",) * 3
    ln, rms = load_reference(tmp_path / "ln"), load_reference(tmp_path / "rms")
    for ids in prompts():
        cap_ln, cap_rms = {}, {}
        a, b = ln(torch.tensor(ids), capture=cap_ln), rms(torch.tensor(ids), capture=cap_rms)
        assert (a - hf_logits(model, ids)).abs().max() < 1e-3
        assert (b - a).abs().max() < 1e-3, f"to-rmsnorm changed logits by {(b - a).abs().max()}"
        for layer in cap_ln:
            before = cap_ln[layer]["norm_in"].mean(-1).abs().mean().item()
            after = cap_rms[layer]["norm_in"].mean(-1).abs().max().item()
            assert before > 0.5 and after < 1e-4, (layer, before, after)
            # what moved is only the per-token mean: the centered stream equals the original minus its mean
            x = cap_ln[layer]["norm_in"]
            assert torch.allclose(cap_rms[layer]["norm_in"], x - x.mean(-1, keepdim=True), atol=1e-4)


def test_rejections(tmp_path, tok):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                             ffn_dim=256, do_layer_norm_before=False, word_embed_proj_dim=128)).save_pretrained(
        str(tmp_path / "post"))
    with pytest.raises(ConfigError, match="post-LayerNorm"):
        convert(tmp_path / "post", tmp_path / "x")
    save_hf("llama", tmp_path / "llama", tok)
    with pytest.raises(ConfigError, match="every norm is LayerNorm"):
        convert(tmp_path / "llama", tmp_path / "y", to_rmsnorm=True)


SERVED = [("gpt2", False), ("opt", False), ("llama", False), ("gpt2", True)]


@pytest.fixture(scope="module")
def served_conversions(tmp_path_factory, tok):
    """(kind, to_rms) -> (HF model on the bf16-rounded weights, prompts, vLLM result): every conversion served in
    one offline-runner process (one vLLM import for all four engines)."""
    cases, specs = {}, []
    for kind, to_rms in SERVED:
        root = tmp_path_factory.mktemp(f"{kind}-rms{int(to_rms)}")
        model = save_hf(kind, root / "hf", tok)
        convert(root / "hf", root / "ns", to_rmsnorm=to_rms, dtype="bfloat16")
        ids_list = prompts()
        # same bf16-rounded weights as served: the diff is activation precision
        cases[kind, to_rms] = (model.to(torch.bfloat16).float(), ids_list)
        specs.append({"model": str(root / "ns"), "prompts": ids_list, "max_tokens": 1, "max_model_len": 256})
    return {case: (*cases[case], result) for case, result in zip(cases, run_vllm_offline(specs))}


@pytest.mark.server
@pytest.mark.parametrize("kind,to_rms", SERVED)
def test_vllm_matches_hf(kind, to_rms, served_conversions):
    model, ids_list, result = served_conversions[kind, to_rms]
    diffs = []
    for ids, got in zip(ids_list, result["prompt_logprobs"]):
        want = hf_logits(model, ids).log_softmax(-1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        diffs += (torch.tensor(got) - want).abs().tolist()
    d = torch.tensor(diffs)
    print(f"{kind} to_rmsnorm={to_rms}: vLLM vs HF prompt logprobs max {d.max():.4f} mean {d.mean():.4f}")
    assert d.max() < 0.1 and d.mean() < 0.03
