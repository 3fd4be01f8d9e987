"""The activation switch: pointwise and gated FFNs from vLLM's parallel linear layers (so TP and quantization work).

    pointwise (GELU):  down( f(h W_up + b_up) )
    gated (SwiGLU):    down( g(h W1 + b1) * (h W2 + b2) )   g = swish for SwiGLU; W1 = gate_proj, W2 = up_proj
                                                           (merged as gate_up_proj)

Which function f or g an activation uses is the registry's (registry.GATED_ACTS); the formulas are activations.py's,
shared with the transformers classes (hf_model.py).

Each FFN reports its sites to ``observe(site, tensor)`` (a no-op unless the observer is on).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
)

from vllm_normswap.model.activations import pointwise_fn
from vllm_normswap.registry import GATED_ACTS


class PointwiseFFN(nn.Module):
    def __init__(self, arch, quant_config, prefix: str):
        super().__init__()
        self.act = pointwise_fn(arch.ffn_act)
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


class GatedFFN(nn.Module):
    def __init__(self, arch, quant_config, prefix: str):
        super().__init__()
        self.gate_fn = pointwise_fn(GATED_ACTS[arch.ffn_act])
        self.gate_up_proj = MergedColumnParallelLinear(arch.hidden_size, [arch.intermediate_size] * 2,
                                                       bias=arch.mlp_bias, quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(arch.intermediate_size, arch.hidden_size, bias=arch.mlp_bias,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")

    def forward(self, h: torch.Tensor, observe) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(h)  # this rank's [gate | up] shards
        observe("act_in", gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        a = self.gate_fn(gate) * up
        observe("act_out", a)
        out, _ = self.down_proj(a)
        return out


def make_ffn(arch, quant_config, prefix: str) -> nn.Module:
    return GatedFFN(arch, quant_config, prefix) if arch.gated else PointwiseFFN(arch, quant_config, prefix)
