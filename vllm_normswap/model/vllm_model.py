"""NormSwapForCausalLM: a pre-norm decoder whose pre-FFN norm and FFN activation are config fields.

    x = x + attn(attn_norm(x))
    x = x + probe_shift                        (mean-shift probe; off unless configured)
    x = x + ffn(ffn_norm(x))                   (ffn_norm: layernorm | rmsnorm,  ffn: gelu | swiglu)
    logits = lm_head(final_norm(x))

Built from vLLM's parallel layers, so tensor parallel and quantization methods (ours: normswap_int8) apply.
This module and ffn.py are the only model code that imports vLLM internals (pinned: vLLM 0.32).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.models.interfaces import SupportsQuant
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from vllm_normswap.model.checkpoint_format import check_values, preflight
from vllm_normswap.model.config import NormSwapArch, tensor_shapes
from vllm_normswap.model.ffn import make_ffn
from vllm_normswap.model.norms import make_norm
from vllm_normswap.observe.layer_stats import make_layer_stats
from vllm_normswap.registry import ConfigError


def _no_observe(site: str, x: torch.Tensor) -> None:
    return None


class NormSwapAttention(nn.Module):
    def __init__(self, arch: NormSwapArch, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        if arch.num_attention_heads % tp or (arch.kv_heads % tp and tp % arch.kv_heads):
            raise ConfigError(f"{arch.num_attention_heads} query / {arch.kv_heads} key-value heads cannot be split "
                              f"over --tensor-parallel-size {tp}; use a size that divides the head counts")
        dh = arch.dim_head
        self.num_heads = arch.num_attention_heads // tp
        self.num_kv_heads = max(1, arch.kv_heads // tp)
        self.q_size, self.kv_size = self.num_heads * dh, self.num_kv_heads * dh
        quant = vllm_config.quant_config
        self.qkv_proj = QKVParallelLinear(arch.hidden_size, dh, arch.num_attention_heads, arch.kv_heads,
                                          bias=arch.attention_bias, quant_config=quant, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(arch.num_attention_heads * dh, arch.hidden_size, bias=arch.attention_bias,
                                        quant_config=quant, prefix=f"{prefix}.o_proj")
        self.rotary_emb = None
        if arch.position_embedding_type == "rope":
            self.rotary_emb = get_rope(dh, max_position=arch.max_position_embeddings, is_neox_style=True,
                                       rope_parameters={"rope_theta": arch.rope_theta, "rope_type": "default"})
        self.attn = Attention(self.num_heads, dh, dh ** -0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=vllm_config.cache_config, quant_config=quant, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class NormSwapDecoderLayer(nn.Module):
    def __init__(self, arch: NormSwapArch, vllm_config: VllmConfig, layer: int, prefix: str):
        super().__init__()
        d = arch.hidden_size
        self.input_layernorm = make_norm(arch.attn_norm_type, d, arch)
        self.self_attn = NormSwapAttention(arch, vllm_config, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = make_norm(arch.norm_type, d, arch)  # the pre-FFN norm of the case study
        self.mlp = make_ffn(arch, vllm_config.quant_config, prefix=f"{prefix}.mlp")
        self.probe_shift = arch.probe_shift if arch.probe_applies(layer) else 0.0
        self.stats = make_layer_stats(arch, vllm_config, layer)
        self.observe = self.stats.record if self.stats is not None else _no_observe

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x))
        if self.probe_shift:
            x = x + self.probe_shift
        self.observe("norm_in", x)
        h = self.post_attention_layernorm(x)
        self.observe("norm_out", h)
        out = self.mlp(h, self.observe)
        self.observe("ffn_out", out)
        return x + out


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0})
class NormSwapModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.arch = arch = NormSwapArch.from_dict(vllm_config.model_config.hf_config.to_dict())
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size)
        self.embed_positions = None
        if arch.position_embedding_type == "learned":
            self.embed_positions = VocabParallelEmbedding(arch.max_position_embeddings, arch.hidden_size)
        self.layers = nn.ModuleList(NormSwapDecoderLayer(arch, vllm_config, i, prefix=f"{prefix}.layers.{i}")
                                    for i in range(arch.num_hidden_layers))
        self.norm = make_norm(arch.final_norm_type, arch.hidden_size, arch)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        for layer in self.layers:
            x = layer(positions, x)
        return self.norm(x)


# checkpoint name -> (model parameter, shard id) for the merged projections
_STACKED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
            "gate_proj": ("gate_up_proj", 0)}
_STACKED_GATED = {**_STACKED, "up_proj": ("gate_up_proj", 1)}
# weight_packed / weight_scale / weight_zero_point ... -> weight (compressed-tensors and similar layouts)
_QUANT_SUFFIX = re.compile(r"^(weight|bias)_\w+$")


class NormSwapForCausalLM(nn.Module, SupportsQuant):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.model = NormSwapModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.arch = arch = self.model.arch
        self.model_path = vllm_config.model_config.model  # a local directory, or a hub id
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if arch.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(arch.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load checkpoint tensors (names: ``config.tensor_shapes``), checking each full-precision tensor's shape
        and that none is missing; errors name the tensor. Before the first tensor is read, ``checkpoint_format.py``
        checks the directory (safetensors only, headers intact, names/shapes/int8 layout) and names every problem
        with its fix; each tensor's values are checked as it streams through (no NaN/Inf). A quantized checkpoint
        stores ``X.weight`` as ``X.weight_<suffix>`` tensors (packed values, scales) that go to the parameters its
        method created."""
        _preflight(self.arch, self.model_path)
        expected = tensor_shapes(self.arch)
        stacked = _STACKED_GATED if self.arch.gated else _STACKED
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        present: set[str] = set()  # checkpoint names, with quantization suffixes folded back to weight/bias
        for name, tensor in weights:
            if self.arch.tie_word_embeddings and name == "lm_head.weight":
                continue  # some exporters write the tied head too
            check_values(name, tensor)  # NaN/Inf weights, non-positive int8 scales: named, not served
            if name in expected and tuple(tensor.shape) != expected[name]:
                raise ConfigError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, but config.json "
                                  f"implies {expected[name]}; the checkpoint and its config.json disagree")
            module, _, leaf = name.rpartition(".")
            base = _QUANT_SUFFIX.sub(r"\1", leaf)
            present.add(f"{module}.{base}")
            owner, _, proj = module.rpartition(".")
            shard = None
            if proj in stacked:
                proj, shard = stacked[proj]
            param_name = ".".join(part for part in (owner, proj, leaf) if part)
            if param_name not in params:
                raise ConfigError(f"unexpected tensor {name!r} in the checkpoint: NormSwap with this config.json "
                                  "(and quantization setting) has no such tensor; see docs/checkpoint-format.md")
            param = params[param_name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor) if shard is None else loader(param, tensor, shard)
            loaded.add(param_name)
        missing = sorted(set(expected) - present)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ConfigError(f"checkpoint lacks tensor(s) {missing[:5]}{more}; a complete checkpoint needs every "
                              "tensor listed in docs/checkpoint-format.md for its config.json")
        if self.arch.tie_word_embeddings:
            loaded.add("lm_head.weight")
        return loaded


def _preflight(arch: NormSwapArch, model_path: str) -> None:
    """Structural checks of the local checkpoint directory before vLLM's iterator opens a file (a truncated or
    pickle-only checkpoint would otherwise fail deep in a loader, or be unpickled). A hub id (not a local
    directory) is not checked here; the per-tensor checks still apply."""
    model = Path(model_path)
    if model.is_dir():
        preflight(model, arch)
