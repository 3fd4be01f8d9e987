"""Exact LayerNorm -> RMSNorm conversion by centering the residual stream (SliceGPT, Ashkboos et al. 2024, sec. 3).

Every LayerNorm subtracts its input's feature mean, so LN(x) = LN(x - mean(x)). If every tensor that WRITES the
residual stream writes zero-mean vectors, the stream itself has zero mean at every token, and then
    LN(x) = alpha (x - mu)/(sigma + eps) + beta = alpha x/(rms(x) + eps) + beta = RMS(x)
exactly (sigma = rms when mu = 0; the same holds with eps inside the root). The writers of a pre-norm decoder:
token embedding rows, position embedding rows, the attention output projection and the FFN down projection
(weights and biases). Centering a writer W (out x in) is W - 1 1^T W / d, b - mean(b). alpha and beta are kept.

What changes: the residual-stream values (each token's vector shifts by minus its feature mean, so the norm_in
mean mu becomes ~0); norm outputs, FFN activations and logits do not. The centered o_proj / down_proj / embedding
weights are different tensors, so their int8 per-channel scales change, and the observer's norm_in counters see
the centered stream. Tied embeddings are untied: the LM head keeps the original rows, since final-norm outputs
are not zero-sum.
"""

from __future__ import annotations

import torch

from vllm_normswap.model.config import NormSwapArch
from vllm_normswap.registry import ConfigError


def center_rows(w: torch.Tensor) -> torch.Tensor:
    """Each row (an embedding vector over d features) minus its mean."""
    return w - w.mean(dim=-1, keepdim=True)


def center_output(w: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight [d_out, d_in] whose outputs are then zero-mean over d_out: subtract the mean over the
    output dimension from every column."""
    return w - w.mean(dim=0, keepdim=True)


def to_rmsnorm(arch: NormSwapArch, tensors: dict[str, torch.Tensor]) -> tuple[NormSwapArch, dict[str, torch.Tensor]]:
    """Return (arch, tensors) of the function-identical RMSNorm model. Computed in float64, returned in the input
    dtypes."""
    kinds = {"attn_norm_type": arch.attn_norm_type, "norm_type": arch.norm_type,
             "final_norm_type": arch.final_norm_type}
    not_ln = {k: v for k, v in kinds.items() if v != "layernorm"}
    if not_ln:
        raise ConfigError(f"--to-rmsnorm needs a model whose every norm is LayerNorm (centering is exact only when "
                          f"all readers of the residual stream subtract the mean); this one has {not_ln}")
    if arch.probe_shift:
        raise ConfigError("--to-rmsnorm: the source config sets probe_shift; remove it (it is a runtime probe)")
    out = dict(tensors)

    def apply(name: str, fn):
        if name in out:
            out[name] = fn(out[name].double()).to(tensors[name].dtype)

    if arch.tie_word_embeddings:
        out["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    apply("model.embed_tokens.weight", center_rows)
    apply("model.embed_positions.weight", center_rows)
    for i in range(arch.num_hidden_layers):
        for proj in (f"model.layers.{i}.self_attn.o_proj", f"model.layers.{i}.mlp.down_proj"):
            apply(f"{proj}.weight", center_output)
            apply(f"{proj}.bias", lambda b: b - b.mean())
    new_arch = arch.replace(norm_type="rmsnorm", attn_norm_type="rmsnorm", final_norm_type="rmsnorm",
                            tie_word_embeddings=False)
    return new_arch, out
