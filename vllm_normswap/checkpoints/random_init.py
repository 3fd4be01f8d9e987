"""`normswap init OPTION DST`: a randomly initialised NormSwap checkpoint with a small local tokenizer.

For tests and smoke runs (no download). The option sets (norm_type, ffn_act); SwiGLU options get the width rule
of ``config.swiglu_width`` so all four have about the same parameter count.
"""

from __future__ import annotations

import json

import torch

from vllm_normswap.model.config import NormSwapArch, swiglu_width
from vllm_normswap.registry import GATED_ACTS, OPTIONS, option_fields


def make_arch(option: str, hidden_size=128, layers=2, heads=2, kv_heads=None, gelu_width=None, vocab_size=512,
              max_positions=512, **overrides) -> NormSwapArch:
    fields = option_fields(option)
    width = gelu_width or 4 * hidden_size
    if fields["ffn_act"] in GATED_ACTS:  # a third matrix: the width shrinks to keep the parameter count
        width = swiglu_width(width)
    return NormSwapArch(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=width,
                        max_position_embeddings=max_positions, **fields, **overrides)


def write_random_checkpoint(dst, arch: NormSwapArch, seed: int = 0, dtype=torch.bfloat16, tokenizer=None,
                            bias_std: float = 0.0):
    """Write config + random weights (+ tokenizer: trained on stdlib text unless one is given)."""
    from vllm_normswap.checkpoints.files import save_checkpoint
    from vllm_normswap.checkpoints.tokenizer import save_hf_tokenizer, stdlib_sample, train_bpe
    from vllm_normswap.model.reference import ReferenceModel

    torch.manual_seed(seed)
    model = ReferenceModel(arch)
    model.reset_parameters(seed=seed)
    tensors = model.state_dict_for_checkpoint()
    if bias_std:  # non-zero biases and norm affine params, so tests exercise every tensor
        g = torch.Generator().manual_seed(seed + 1)
        for name, t in tensors.items():
            if name.endswith("bias") or "norm" in name:
                t.add_(torch.randn(t.shape, generator=g) * bias_std)
    save_checkpoint(dst, arch, tensors, dtype=dtype)
    if tokenizer is None:
        tokenizer = train_bpe(stdlib_sample(), arch.vocab_size)
    save_hf_tokenizer(tokenizer, dst)
    return dst


def add_arguments(p) -> None:
    p.add_argument("option", choices=list(OPTIONS), help="the option (pre-FFN norm and FFN activation)")
    p.add_argument("dst", help="output checkpoint directory")
    p.add_argument("--hidden-size", type=int, default=128, help="model width d")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--heads", type=int, default=2, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (None = --heads)")
    p.add_argument("--vocab-size", type=int, default=512, help="vocabulary size")
    p.add_argument("--position", choices=["learned", "rope"], default="learned",
                   help="position embedding: learned absolute table or rotary")
    p.add_argument("--eps-placement", choices=["outside_sqrt", "inside_sqrt"], default="outside_sqrt",
                   help="norm epsilon: (sigma + eps) as the case study writes it, or sqrt(var + eps)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")


def run(args) -> int:
    arch = make_arch(args.option, hidden_size=args.hidden_size, layers=args.layers, heads=args.heads,
                     kv_heads=args.kv_heads, vocab_size=args.vocab_size, position_embedding_type=args.position,
                     norm_eps_placement=args.eps_placement)
    write_random_checkpoint(args.dst, arch, seed=args.seed)
    print(json.dumps({"checkpoint": args.dst, "option": args.option, "config": arch.to_dict()}))
    return 0
