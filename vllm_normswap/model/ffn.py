"""The activation switch: GELU FFN and SwiGLU FFN from vLLM's parallel linear layers (so TP and quantization work).

    GELU:   down( gelu(h W_up + b_up) )
    SwiGLU: down( swish(h W1 + b1) * (h W2 + b2) )      W1 = gate_proj, W2 = up_proj (merged as gate_up_proj)

Each FFN reports its sites to ``observe(site, tensor)`` (a no-op unless the observer is on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
)

_POINTWISE = {
    "gelu": lambda x: F.gelu(x),  # exact (erf), the case study's GELU
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's gelu_new
    "relu": F.relu,  # converted OPT checkpoints
}


class PointwiseFFN(nn.Module):
    def __init__(self, arch, quant_config, prefix: str):
        super().__init__()
        self.act = _POINTWISE[arch.ffn_act]
        self.up_proj = ColumnParallelLinear(arch.hidden_size, arch.intermediate_size, bias=arch.mlp_bias,
                                            quant_config=quant_config, prefix=f"{prefix}.up_proj")
        self.down_proj = RowParallelLinear(arch.intermediate_size, arch.hidden_size, bias=arch.mlp_bias,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")

    def forward(self, h: torch.Tensor, observe) -> torch.Tensor:
        up, _ = self.up_proj(h)
        observe("act_in", up)
        a = self.act(up)
        observe("act_out", a)
        out, _ = self.down_proj(a)
        return out


class SwiGLUFFN(nn.Module):
    def __init__(self, arch, quant_config, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(arch.hidden_size, [arch.intermediate_size] * 2,
                                                       bias=arch.mlp_bias, quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(arch.intermediate_size, arch.hidden_size, bias=arch.mlp_bias,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")

    def forward(self, h: torch.Tensor, observe) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(h)  # this rank's [gate | up] shards
        observe("act_in", gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        a = F.silu(gate) * up
        observe("act_out", a)
        out, _ = self.down_proj(a)
        return out


def make_ffn(arch, quant_config, prefix: str) -> nn.Module:
    return SwiGLUFFN(arch, quant_config, prefix) if arch.gated else PointwiseFFN(arch, quant_config, prefix)
