"""NormSwapForCausalLM for Hugging Face transformers: the same decoder as the vLLM model, for training and tools.

    x = x + attn(attn_norm(x))
    x = x + probe_shift                        (mean-shift probe; off unless configured)
    x = x + ffn(ffn_norm(x))                   (ffn_norm: layernorm | rmsnorm,  ffn: pointwise | gated)
    logits = lm_head(final_norm(x))

What is written once is shared with vLLM's model (vllm_model.py): the validated config (``NormSwapArch``), the
norms (norms.py), the FFN functions (activations.py, chosen through registry.GATED_ACTS). What differs is glue:
plain ``nn.Linear`` / ``nn.Embedding`` instead of vLLM's parallel layers, and transformers' attention functions
(sdpa, eager, flash), masks and KV cache instead of vLLM's paged attention. Module names equal the checkpoint's
tensor names (``config.tensor_shapes``), so ``from_pretrained`` reads what vLLM serves and ``save_pretrained``
writes what vLLM serves. The pure-torch reference (reference.py) shares none of this: it stays the tests' truth.

Importing this module registers the classes with AutoConfig / AutoModelForCausalLM (``register_transformers``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vllm_normswap.model.activations import pointwise_fn
from vllm_normswap.model.config import MODEL_TYPE, NormSwapArch
from vllm_normswap.model.hf_config import NormSwapConfig
from vllm_normswap.model.norms import Norm, make_norm
from vllm_normswap.registry import GATED_ACTS


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of RoPE angles pos * theta^(-2i/dim), i < dim/2, repeated over both halves (neox layout), in fp32
    as vLLM's rotary cache is. positions: [B, T] -> [B, 1, T, dim] each (broadcast over heads)."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+dim/2}) by their angle: the neox style Llama checkpoints and vLLM's get_rope use."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1).float() * sin).to(x.dtype)


def eager_attention(module, q, k, v, attention_mask, scaling, dropout=0.0, **kwargs):
    """softmax(Q K^T * scaling + mask) V with key/value heads repeated for GQA; q, k, v: [B, heads, T, Dh]. The
    fallback when ``attn_implementation="eager"`` (sdpa and flash come from transformers)."""
    k = k.repeat_interleave(module.num_key_value_groups, dim=1)
    v = v.repeat_interleave(module.num_key_value_groups, dim=1)
    scores = q @ k.transpose(-1, -2) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.dropout(scores.float().softmax(-1).to(q.dtype), p=dropout, training=module.training)
    return (weights @ v).transpose(1, 2).contiguous(), weights


class NormSwapAttention(nn.Module):
    def __init__(self, config: NormSwapConfig, arch: NormSwapArch, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = dh = arch.dim_head
        self.num_key_value_groups = arch.num_attention_heads // arch.kv_heads
        self.scaling = dh ** -0.5
        self.is_causal = True
        self.rope_theta = arch.rope_theta if arch.position_embedding_type == "rope" else None
        d, q, kv, bias = arch.hidden_size, arch.num_attention_heads * dh, arch.kv_heads * dh, arch.attention_bias
        self.q_proj = nn.Linear(d, q, bias=bias)
        self.k_proj = nn.Linear(d, kv, bias=bias)
        self.v_proj = nn.Linear(d, kv, bias=bias)
        self.o_proj = nn.Linear(q, d, bias=bias)

    def forward(self, x, positions, attention_mask, past_key_values: Cache | None = None, **kwargs):
        heads = (*x.shape[:-1], -1, self.head_dim)
        q, k, v = (proj(x).view(heads).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.rope_theta is not None:
            cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, _ = attend(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.o_proj(out.reshape(*x.shape[:-1], -1))


class PointwiseFFN(nn.Module):
    """down(f(h W_up + b_up)), f = the activation's function (GELU)."""

    def __init__(self, arch: NormSwapArch):
        super().__init__()
        self.act = pointwise_fn(arch.ffn_act)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=arch.mlp_bias)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=arch.mlp_bias)

    def forward(self, h):
        return self.down_proj(self.act(self.up_proj(h)))


class GatedFFN(nn.Module):
    """down(g(h W_gate + b_gate) * (h W_up + b_up)), g = the gate function registry.GATED_ACTS names (SwiGLU:
    swish)."""

    def __init__(self, arch: NormSwapArch):
        super().__init__()
        self.gate_fn = pointwise_fn(GATED_ACTS[arch.ffn_act])
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=arch.mlp_bias)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=arch.mlp_bias)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=arch.mlp_bias)

    def forward(self, h):
        return self.down_proj(self.gate_fn(self.gate_proj(h)) * self.up_proj(h))


class NormSwapDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: NormSwapConfig, arch: NormSwapArch, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(arch.attn_norm_type, arch.hidden_size, arch)
        self.self_attn = NormSwapAttention(config, arch, layer_idx)
        self.post_attention_layernorm = make_norm(arch.norm_type, arch.hidden_size, arch)  # the pre-FFN norm
        self.mlp = GatedFFN(arch) if arch.gated else PointwiseFFN(arch)
        self.probe_shift = arch.probe_shift if arch.probe_applies(layer_idx) else 0.0

    def forward(self, x, positions, attention_mask=None, past_key_values=None, **kwargs):
        x = x + self.self_attn(self.input_layernorm(x), positions, attention_mask, past_key_values, **kwargs)
        if self.probe_shift:
            x = x + self.probe_shift
        return x + self.mlp(self.post_attention_layernorm(x))


class NormSwapPreTrainedModel(PreTrainedModel):
    config_class = NormSwapConfig
    config: NormSwapConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NormSwapDecoderLayer"]  # FSDP / device_map: a layer stays on one device
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True  # sdpa (the default) and eager are what tests/model/test_hf_model.py checks

    def _init_weights(self, module):
        """The zoo's initialisation (reference.py's reset_parameters): N(0, initializer_range) matrices, zero biases,
        norms at identity, and GPT-2's 1/sqrt(2 L) on the projections that write into the residual stream. Loaded
        tensors are flagged by transformers and left alone."""
        std = self.config.initializer_range
        if isinstance(module, Norm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (NormSwapAttention, PointwiseFFN, GatedFFN)):  # after its children (post-order)
            writer = module.o_proj if isinstance(module, NormSwapAttention) else module.down_proj
            init.normal_(writer.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))


class NormSwapModel(NormSwapPreTrainedModel):
    def __init__(self, config: NormSwapConfig):
        super().__init__(config)
        # validated once here, as in the vLLM model: an unknown norm or activation fails naming field and values
        self.arch = arch = NormSwapArch.from_dict(config.to_dict())
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.embed_positions = None
        if arch.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(arch.max_position_embeddings, arch.hidden_size)
        self.layers = nn.ModuleList(NormSwapDecoderLayer(config, arch, i) for i in range(arch.num_hidden_layers))
        self.norm = make_norm(arch.final_norm_type, arch.hidden_size, arch)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:  # positions continue after the cached tokens; generate() passes its own
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(x.shape[1], device=x.device) + past)[None]
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids)
        mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask,
                                  past_key_values=past_key_values, position_ids=position_ids)
        for layer in self.layers:
            x = layer(x, position_ids, mask, past_key_values, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), past_key_values=past_key_values)


class NormSwapForCausalLM(NormSwapPreTrainedModel, GenerationMixin):
    # tie_word_embeddings (the zoo's default): the head is the embedding, and save_pretrained leaves it out, as the
    # checkpoint format does
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NormSwapConfig):
        super().__init__(config)
        self.model = NormSwapModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """``labels``: the loss is transformers' causal-LM cross entropy (labels shifted by one inside, -100
        ignored). ``logits_to_keep``: only the last n positions' logits (generate() asks for 1)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


def register_transformers() -> None:
    """AutoConfig / AutoModelForCausalLM for model_type "normswap", so that ``AutoModelForCausalLM.from_pretrained``
    and tools built on it (lm-eval's ``hf`` backend, Trainer scripts) load NormSwap checkpoints without
    trust_remote_code. Idempotent."""
    AutoConfig.register(MODEL_TYPE, NormSwapConfig, exist_ok=True)
    AutoModelForCausalLM.register(NormSwapConfig, NormSwapForCausalLM, exist_ok=True)


register_transformers()
