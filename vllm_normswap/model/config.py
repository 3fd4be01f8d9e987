"""NormSwap architecture config: Hugging Face field names plus the two knobs of the case study.

Torch-free and vLLM-free: the CLI, the checkpoint tools, the reference and the vLLM model all read the same
validated object. Every field carries a one-line comment saying what it means (nanoGPT style).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from vllm_normswap.registry import (
    EPS_PLACEMENTS,
    GATED_ACTS,
    NORM_TYPES,
    OPTIONS,
    POSITION_TYPES,
    ConfigError,
    check_choice,
    ffn_acts,
    option_of,
)

ARCHITECTURE = "NormSwapForCausalLM"
MODEL_TYPE = "normswap"


@dataclasses.dataclass(frozen=True)
class NormSwapArch:
    vocab_size: int  # tokenizer vocabulary size (rows of the embedding)
    hidden_size: int  # d: width of the residual stream
    num_hidden_layers: int  # decoder blocks
    num_attention_heads: int  # query heads
    intermediate_size: int  # FFN hidden width (for swiglu: width of each of gate and up)
    max_position_embeddings: int  # longest sequence (rows of the learned position table)
    num_key_value_heads: int | None = None  # GQA: key/value heads (None = num_attention_heads)
    head_dim: int | None = None  # per-head width (None = hidden_size // num_attention_heads)
    # --- the two knobs of the case study ---
    norm_type: str = "layernorm"  # pre-FFN norm: layernorm | rmsnorm
    ffn_act: str = "gelu"  # FFN: registry.ffn_acts(): gelu (exact erf) | gelu_tanh | relu (converted OPT) | swiglu
    # --- where else the norm switch applies (the case study changes only the pre-FFN norm) ---
    attn_norm_type: str = "layernorm"  # norm before attention: layernorm | rmsnorm
    final_norm_type: str = "layernorm"  # norm before the LM head: layernorm | rmsnorm
    norm_eps: float = 1e-5  # epsilon of every norm
    norm_eps_placement: str = "outside_sqrt"  # outside_sqrt: (sigma + eps) as the case study; inside_sqrt: sqrt(var + eps)
    norm_bias: bool = True  # beta in every norm (RMSNorm WITH beta, as the case study writes it)
    # --- the rest of a pre-norm decoder ---
    position_embedding_type: str = "learned"  # learned absolute table | rope
    rope_theta: float = 10000.0  # RoPE base (rope only)
    attention_bias: bool = True  # biases on q/k/v/o projections
    mlp_bias: bool = True  # biases on FFN projections (b1, b2 of the seed formula, and the down projection)
    tie_word_embeddings: bool = True  # LM head shares the token embedding matrix
    initializer_range: float = 0.02  # std of random init (tests, zoo training)
    # --- runtime knob, not architecture (set with --hf-overrides): the case study's diagnostic on demand ---
    probe_shift: float = 0.0  # mean-shift probe: constant c added to the residual stream entering the pre-FFN norm
    probe_layers: tuple[int, ...] | None = None  # layers the probe shifts (None = all)
    expect_option: str | None = None  # set by a serving config: refuse to serve a checkpoint of another option

    def __post_init__(self):
        check_choice("norm_type", self.norm_type, NORM_TYPES)
        check_choice("attn_norm_type", self.attn_norm_type, NORM_TYPES)
        check_choice("final_norm_type", self.final_norm_type, NORM_TYPES)
        check_choice("ffn_act", self.ffn_act, ffn_acts())
        check_choice("norm_eps_placement", self.norm_eps_placement, EPS_PLACEMENTS)
        check_choice("position_embedding_type", self.position_embedding_type, POSITION_TYPES)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"config field {name!r} = {getattr(self, name)!r} must be a positive integer")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; set head_dim explicitly or change the head count")
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of num_key_value_heads "
                f"{self.kv_heads}")
        if self.probe_layers is not None:
            object.__setattr__(self, "probe_layers", tuple(int(i) for i in self.probe_layers))
            bad = [i for i in self.probe_layers if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ConfigError(f"probe_layers {bad} outside 0..{self.num_hidden_layers - 1}")
        if self.expect_option is not None:
            check_choice("expect_option", self.expect_option, tuple(OPTIONS))
            if self.option != self.expect_option:
                raise ConfigError(
                    f"the serving config is for option {self.expect_option!r} but the checkpoint is "
                    f"norm_type={self.norm_type!r}, ffn_act={self.ffn_act!r} (option {self.option!r}); "
                    f"serve it with normswap serve {self.option} (its config: "
                    f"serving_configs/{self.option}.yaml) or pass the right checkpoint")
        if not self.norm_eps > 0:
            raise ConfigError(f"config field 'norm_eps' = {self.norm_eps!r} must be > 0")

    # ---- derived ----
    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def gated(self) -> bool:
        return self.ffn_act in GATED_ACTS

    def probe_applies(self, layer: int) -> bool:
        return self.probe_shift != 0.0 and (self.probe_layers is None or layer in self.probe_layers)

    @property
    def option(self) -> str | None:
        return option_of(self.norm_type, self.ffn_act)

    # ---- (de)serialisation: Hugging Face config.json ----
    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "NormSwapArch":
        """Build from a config.json dict (or a transformers config's ``to_dict()``); unknown keys are ignored
        (transformers adds many), missing required ones are named."""
        fields = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if cfg.get(name) is None]
        if missing:
            raise ConfigError(f"config.json lacks required field(s) {missing}; see docs/checkpoint-format.md")
        return cls(**{k: v for k, v in cfg.items() if k in fields and v is not None})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(architectures=[ARCHITECTURE], model_type=MODEL_TYPE, num_key_value_heads=self.kv_heads,
                 head_dim=self.dim_head)
        return d

    def replace(self, **changes) -> "NormSwapArch":
        return dataclasses.replace(self, **changes)


def swiglu_width(gelu_width: int, multiple_of: int = 64) -> int:
    """SwiGLU hidden width that keeps the FFN parameter count of a GELU FFN of width ``gelu_width``:
    3 d f' = 2 d f  =>  f' = 2f/3, rounded to a multiple of ``multiple_of`` (kernel-friendly)."""
    return max(multiple_of, multiple_of * round(2 * gelu_width / 3 / multiple_of))


def tensor_shapes(arch: NormSwapArch) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint must hold, with its full (unsharded) shape. This is the checkpoint format."""
    d, f, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    q, kv = arch.num_attention_heads * arch.dim_head, arch.kv_heads * arch.dim_head
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    if arch.position_embedding_type == "learned":
        shapes["model.embed_positions.weight"] = (arch.max_position_embeddings, d)

    def norm(prefix: str):
        shapes[f"{prefix}.weight"] = (d,)
        if arch.norm_bias:
            shapes[f"{prefix}.bias"] = (d,)

    def linear(prefix: str, out_features: int, in_features: int, bias: bool):
        shapes[f"{prefix}.weight"] = (out_features, in_features)
        if bias:
            shapes[f"{prefix}.bias"] = (out_features,)

    for i in range(arch.num_hidden_layers):
        p = f"model.layers.{i}"
        norm(f"{p}.input_layernorm")
        linear(f"{p}.self_attn.q_proj", q, d, arch.attention_bias)
        linear(f"{p}.self_attn.k_proj", kv, d, arch.attention_bias)
        linear(f"{p}.self_attn.v_proj", kv, d, arch.attention_bias)
        linear(f"{p}.self_attn.o_proj", d, q, arch.attention_bias)
        norm(f"{p}.post_attention_layernorm")
        if arch.gated:
            linear(f"{p}.mlp.gate_proj", f, d, arch.mlp_bias)
        linear(f"{p}.mlp.up_proj", f, d, arch.mlp_bias)
        linear(f"{p}.mlp.down_proj", d, f, arch.mlp_bias)
    norm("model.norm")
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def parameter_count(arch: NormSwapArch) -> int:
    return sum(math.prod(s) for s in tensor_shapes(arch).values())


def parameter_report(arch: NormSwapArch) -> dict[str, dict[str, float]]:
    """Parameter counts of the four options built on ``arch`` (a GELU-width config), with the SwiGLU width rule
    applied, and each option's deviation from the baseline in percent."""
    from vllm_normswap.registry import BASELINE, OPTIONS

    out = {}
    for option, o in OPTIONS.items():
        width = swiglu_width(arch.intermediate_size) if o.ffn_act in GATED_ACTS else arch.intermediate_size
        out[option] = {"intermediate_size": width,
                       "parameters": parameter_count(arch.replace(**o.fields, intermediate_size=width))}
    base = out[BASELINE]["parameters"]
    for row in out.values():
        row["vs_baseline_pct"] = round(100.0 * (row["parameters"] - base) / base, 3)
    return out
