"""Random-init Hugging Face GPT-2 / OPT / Llama models built by transformers from small configs (no download),
head_dim 64 (vLLM's CPU attention needs it), with non-zero biases / norm parameters and, for the LayerNorm
models, a constant offset on the position embeddings: a residual stream with a large positive mean, like the
case study's problematic layer."""

from __future__ import annotations

import torch

VOCAB = 512


def build(kind: str, seed: int = 0, mean_shift: float = 1.0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=2, n_positions=256,
                                           initializer_range=0.1))
    elif kind == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, ffn_dim=512, max_position_embeddings=256,
                                         word_embed_proj_dim=128, do_layer_norm_before=True, init_std=0.1))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
                                             max_position_embeddings=256, initializer_range=0.1,
                                             tie_word_embeddings=False))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            if kind != "llama" and ("wpe" in name or "embed_positions" in name):
                p.add_(mean_shift)
    return model.eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()
