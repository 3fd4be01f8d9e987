"""The norm switch: LayerNorm and RMSNorm exactly as the case study writes them (torch only).

    LN(h)  = alpha * (h - mu) / (sigma + eps) + beta        mu, sigma: mean and (population) std over features
    RMS(h) = alpha * h / (rms(h) + eps) + beta               rms(h) = sqrt(mean_k h_k^2), no mean subtraction

``eps_placement="inside_sqrt"`` gives the common-checkpoint variant: sigma -> sqrt(var + eps), rms -> sqrt(ms + eps).
Computed in fp32 and cast back, as vLLM's own norms do. Plain torch ops: Inductor fuses them into one kernel.
"""

from __future__ import annotations

import torch
from torch import nn


class Norm(nn.Module):
    def __init__(self, kind: str, dim: int, eps: float, eps_placement: str = "outside_sqrt", bias: bool = True,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.kind, self.eps, self.eps_inside = kind, eps, eps_placement == "inside_sqrt"
        self.subtract_mean = kind == "layernorm"
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))  # alpha
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype)) if bias else None  # beta

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        if self.subtract_mean:
            x = x - x.mean(dim=-1, keepdim=True)
        # after centering, mean(x^2) is the variance, so one line serves sigma (LayerNorm) and rms (RMSNorm)
        power = x.pow(2).mean(dim=-1, keepdim=True)
        denom = torch.sqrt(power + self.eps) if self.eps_inside else torch.sqrt(power) + self.eps
        y = x / denom * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(h.dtype)

    def extra_repr(self) -> str:
        where = "sqrt(.+eps)" if self.eps_inside else "sqrt(.)+eps"
        return f"{self.kind}, dim={self.weight.numel()}, eps={self.eps} {where}, bias={self.bias is not None}"


def make_norm(kind: str, dim: int, arch) -> Norm:
    """One norm of the model; ``kind`` is one of the arch's *_norm_type fields."""
    return Norm(kind, dim, arch.norm_eps, arch.norm_eps_placement, arch.norm_bias)
