"""The FFN functions the registry may name (registry.POINTWISE_FNS), as torch writes them (torch only).

One table for both models that run the math: the vLLM layers (model/ffn.py) and the transformers classes
(model/hf_model.py). The pure-torch reference (model/reference.py) writes its own, from the definitions, so that
both are checked against an independent formula.
"""

from __future__ import annotations

import torch.nn.functional as F

FUNCTIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf), the case study's GELU
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's gelu_new
    "relu": F.relu,  # converted OPT checkpoints
    "silu": F.silu,  # swish, SwiGLU's gate
}


def pointwise_fn(name: str):
    """The torch function of a registry function name; a name this file lacks fails at model construction."""
    if name not in FUNCTIONS:
        raise NotImplementedError(f"FFN function {name!r} (registry.GATED_ACTS / POINTWISE_ACTS) has no formula in "
                                  f"vllm_normswap/model/activations.py (known: {', '.join(FUNCTIONS)}); add it to "
                                  f"FUNCTIONS there and to model/reference.py")
    return FUNCTIONS[name]
