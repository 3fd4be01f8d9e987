"""Pure-torch reference of NormSwapForCausalLM, written straight from the formulas (no vLLM).

Used by the tests as the independent truth (logprobs, greedy text, outlier counts), and by the zoo trainer.
It deliberately shares no code with the vLLM model (not even the norms): the norms below are re-derived from the
case study's formulas, and attention is spelled out (softmax(QK^T/sqrt(d_h) + causal mask) V).
Parameter names equal the checkpoint tensor names (see ``config.tensor_shapes``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vllm_normswap.model.config import NormSwapArch, tensor_shapes

from vllm_normswap.registry import GATED_ACTS, SITES  # noqa: F401  (SITES: capture keys)


def layer_norm(h, alpha, beta, eps, inside):
    """LN(h) = alpha (h - mu) / (sigma + eps) + beta; sigma is the population std over features."""
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    sigma_eps = torch.sqrt(var + eps) if inside else torch.sqrt(var) + eps
    out = alpha * (h - mu) / sigma_eps
    return out + beta if beta is not None else out


def rms_norm(h, alpha, beta, eps, inside):
    """RMS(h) = alpha h / (rms(h) + eps) + beta; rms(h) = sqrt(1/d sum_k h_k^2)."""
    ms = (h * h).mean(-1, keepdim=True)
    rms_eps = torch.sqrt(ms + eps) if inside else torch.sqrt(ms) + eps
    out = alpha * h / rms_eps
    return out + beta if beta is not None else out


# The FFN functions the registry may name (registry.POINTWISE_FNS), written out from their definitions rather
# than taken from torch.nn.functional or model/activations.py, so the vLLM and transformers models are checked
# against an independent formula.
FUNCTIONS = {
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))),  # x Phi(x), exact
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: x.clamp_min(0),
    "silu": lambda x: x * torch.sigmoid(x),  # swish_1, SwiGLU's gate
}


def function(name: str):
    """The formula of a registry function name; a name without one fails here instead of computing something
    else."""
    if name not in FUNCTIONS:
        raise NotImplementedError(f"FFN function {name!r} (registry.GATED_ACTS / POINTWISE_ACTS) has no formula in "
                                  f"vllm_normswap/model/reference.py (known: {', '.join(FUNCTIONS)}); write it "
                                  f"into FUNCTIONS there, independently of model/activations.py")
    return FUNCTIONS[name]


def rotate_half_rope(x, positions, theta):
    """Neox-style RoPE (rotate halves), as Llama checkpoints use."""
    """x: [B, T, H, Dh], positions: [T]."""
    dh = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
    ang = positions.double()[:, None] * inv_freq[None, :]  # [T, Dh/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None, :].to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None, :].to(x.dtype)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class ReferenceModel(nn.Module):
    """Holds the checkpoint tensors under their checkpoint names in a flat ParameterDict."""

    def __init__(self, arch: NormSwapArch, dtype=torch.float32):
        super().__init__()
        self.arch = arch
        # the FFN's function (a gated FFN's gate function); an activation without a formula fails here
        self.ffn_fn = function(GATED_ACTS[arch.ffn_act] if arch.gated else arch.ffn_act)
        self.shapes = tensor_shapes(arch)
        self.params = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(torch.empty(s, dtype=dtype))
                                        for k, s in self.shapes.items()})
        self.reset_parameters()

    # ---- weights ----
    def p(self, name):
        key = name.replace(".", "__")
        return self.params[key] if key in self.params else None

    def reset_parameters(self, seed: int | None = None):
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.arch.initializer_range
        with torch.no_grad():
            for key, param in self.params.items():
                name = key.replace("__", ".")
                if "layernorm" in name or name.startswith("model.norm"):
                    param.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=g) * std)
                    if name.endswith(("o_proj.weight", "down_proj.weight")):  # GPT-2 style residual scaling
                        param.mul_(1 / math.sqrt(2 * self.arch.num_hidden_layers))

    def state_dict_for_checkpoint(self) -> dict[str, torch.Tensor]:
        return {k.replace("__", "."): v.detach() for k, v in self.params.items()}

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]):
        missing = sorted(set(self.shapes) - set(tensors))
        if missing:
            raise KeyError(f"checkpoint lacks tensors {missing[:5]}")
        with torch.no_grad():
            for name in self.shapes:
                self.p(name).copy_(tensors[name].to(self.p(name).dtype))

    # ---- forward ----
    def norm(self, kind, prefix, h):
        a = self.arch
        f = layer_norm if kind == "layernorm" else rms_norm
        return f(h, self.p(f"{prefix}.weight"), self.p(f"{prefix}.bias"), a.norm_eps,
                 a.norm_eps_placement == "inside_sqrt")

    def linear(self, prefix, x):
        return F.linear(x, self.p(f"{prefix}.weight"), self.p(f"{prefix}.bias"))

    def attention(self, i, x, positions):
        """x: [B, T, d]. softmax(Q K^T / sqrt(d_h) + causal mask) V, heads spelled out."""
        a = self.arch
        B, T, nh, nkv, dh = x.shape[0], x.shape[1], a.num_attention_heads, a.kv_heads, a.dim_head
        p = f"model.layers.{i}.self_attn"
        q = self.linear(f"{p}.q_proj", x).view(B, T, nh, dh)
        k = self.linear(f"{p}.k_proj", x).view(B, T, nkv, dh)
        v = self.linear(f"{p}.v_proj", x).view(B, T, nkv, dh)
        if a.position_embedding_type == "rope":
            q, k = rotate_half_rope(q, positions, a.rope_theta), rotate_half_rope(k, positions, a.rope_theta)
        k = k.repeat_interleave(nh // nkv, dim=2)
        v = v.repeat_interleave(nh // nkv, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, nh * dh)
        return self.linear(f"{p}.o_proj", out)

    def ffn(self, i, h, capture):
        """The seed FFN. Pointwise (GELU): W_down f(h W_up + b); gated (SwiGLU): W_down [g(h W1 + b1) * (h W2 + b2)],
        g = swish for SwiGLU. The registry names f or g (GATED_ACTS); the formulas are FUNCTIONS, above."""
        a, p = self.arch, f"model.layers.{i}.mlp"
        up = self.linear(f"{p}.up_proj", h)
        if a.gated:
            gate = self.linear(f"{p}.gate_proj", h)
            act_in = torch.cat([gate, up], -1)  # the observer sees gate and up together
            act = self.ffn_fn(gate) * up
        else:
            act_in = up
            act = self.ffn_fn(up)
        out = self.linear(f"{p}.down_proj", act)
        if capture is not None:
            capture.setdefault(i, {}).update(act_in=act_in.detach(), act_out=act.detach(), ffn_out=out.detach())
        return out

    def forward(self, token_ids: torch.Tensor, capture: dict | None = None) -> torch.Tensor:
        """``token_ids``: [T] (one sequence) or [B, T]. Returns logits [..., T, vocab] in fp32. If ``capture`` is a
        dict, it is filled with {layer: {site: tensor}} for the observer sites (shaped like the input)."""
        a = self.arch
        single = token_ids.dim() == 1
        if single:
            token_ids = token_ids[None]
        T = token_ids.shape[1]
        positions = torch.arange(T, device=token_ids.device)
        x = self.p("model.embed_tokens.weight")[token_ids]
        if a.position_embedding_type == "learned":
            x = x + self.p("model.embed_positions.weight")[positions]
        for i in range(a.num_hidden_layers):
            x = x + self.attention(i, self.norm(a.attn_norm_type, f"model.layers.{i}.input_layernorm", x), positions)
            if a.probe_applies(i):
                x = x + a.probe_shift
            h = self.norm(a.norm_type, f"model.layers.{i}.post_attention_layernorm", x)
            if capture is not None:
                capture.setdefault(i, {}).update(norm_in=x.detach(), norm_out=h.detach())
            x = x + self.ffn(i, h, capture)
        x = self.norm(a.final_norm_type, "model.norm", x)
        head = self.p("lm_head.weight") if not a.tie_word_embeddings else self.p("model.embed_tokens.weight")
        logits = F.linear(x, head).float()
        if single:
            logits = logits[0]
            if capture is not None:
                for sites in capture.values():
                    for site, t in sites.items():
                        sites[site] = t[0]
        return logits

    @torch.no_grad()
    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(token_t | tokens_<t) for t >= 1, as vLLM's prompt_logprobs returns them."""
        ids = torch.tensor(token_ids)
        logp = self.forward(ids).log_softmax(-1)
        return logp[:-1].gather(-1, ids[1:, None]).squeeze(-1).tolist()

    @torch.no_grad()
    def greedy(self, token_ids: list[int], n: int) -> tuple[list[int], list[float]]:
        """Greedy continuation of n tokens, and the top-1 minus top-2 logit margin at each step."""
        ids, margins = list(token_ids), []
        for _ in range(n):
            logits = self.forward(torch.tensor(ids))[-1]
            top = logits.topk(2)
            margins.append(float(top.values[0] - top.values[1]))
            ids.append(int(top.indices[0]))
        return ids[len(token_ids):], margins
