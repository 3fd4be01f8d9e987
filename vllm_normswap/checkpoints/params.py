"""`normswap params`: parameter counts of the four options and the SwiGLU hidden-width rule (±2% budget)."""

from __future__ import annotations

import json

from vllm_normswap.model.config import NormSwapArch


def add_arguments(p) -> None:
    p.add_argument("--from", dest="src", help="a checkpoint dir whose config gives the shape (GELU width)")
    p.add_argument("--hidden-size", type=int, default=192, help="model width d")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--heads", type=int, default=3, help="attention heads")
    p.add_argument("--gelu-width", type=int, default=None, help="GELU FFN width (None = 4 x hidden)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size")


def run(args) -> int:
    if args.src:
        from vllm_normswap.checkpoints.files import load_arch

        arch = load_arch(args.src)
        if arch.gated:
            raise SystemExit(f"{args.src} is a SwiGLU checkpoint; pass the GELU-width config (the rule maps GELU "
                             "width f to SwiGLU width 2f/3)")
    else:
        arch = NormSwapArch(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads,
                            intermediate_size=args.gelu_width or 4 * args.hidden_size, max_position_embeddings=512)
    from vllm_normswap.model.config import parameter_report

    print(json.dumps({"rule": "swiglu_width = round(2 * gelu_width / 3 / 64) * 64",
                      "options": parameter_report(arch)}, indent=2))
    return 0
