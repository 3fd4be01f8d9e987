"""A tiny random in-tree Llama checkpoint (transformers LlamaForCausalLM, no download) with a locally trained
tokenizer: the "any dense vLLM model" case for normswap_int8."""

from __future__ import annotations

from pathlib import Path


def make_llama_checkpoint(dst: Path, tokenizer, seed: int = 0, hidden: int = 256, layers: int = 2,
                          intermediate: int = 512, heads: int = 4, kv_heads: int = 2, vocab: int = 512) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_normswap.checkpoints.tokenizer import save_hf_tokenizer

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.05,
                         torch_dtype="bfloat16", bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(dst), safe_serialization=True)
    save_hf_tokenizer(tokenizer, dst)
    return Path(dst)
