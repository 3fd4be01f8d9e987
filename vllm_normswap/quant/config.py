"""`normswap_int8`: the vLLM QuantizationConfig (which layers, which granularity, online or from a checkpoint).

Two ways in, one linear method family (linear_method.py):
- online: `--quantization normswap_int8` on a bf16/fp16 checkpoint. Granularity defaults to per channel; another
  one is chosen with `--hf-overrides '{"quantization_config": {"quant_method": "normswap_int8",
  "granularity": "group", "group_size": 128}}'`.
- `"lm_head": true` in that quantization_config also quantizes an untied LM head (per output channel, CPU only;
  off by default, as in GPTQ's `lm_head` field: the head is the last layer before sampling). On a 1B model with
  a 44k vocabulary the bf16 head is a fifth of the batch-1 decode step on one core.
- checkpoint: a compressed-tensors W8A16 "pack-quantized" checkpoint (what `normswap quantize` writes, and what
  llm-compressor writes for int8 W8A16). On CPU, where stock vLLM has no kernel for it, this config claims it
  through override_quantization_method; on GPU stock vLLM's compressed-tensors path keeps it unless the user asks
  for `--quantization normswap_int8`.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.platforms import current_platform

from vllm_normswap.quant.primitives import GRANULARITIES, QuantConfigError, check_granularity

NAME = "normswap_int8"
_ONLINE_KEYS = {"quant_method", "granularity", "group_size", "lm_head"}


def parse_compressed_tensors_w8a16(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Return {'granularity', 'group_size', 'ignore'} when cfg is a compressed-tensors int8 weight-only
    symmetric pack-quantized config, else None (some other scheme: not ours)."""
    if cfg.get("quant_method") != "compressed-tensors" or "config_groups" not in cfg:
        return None
    groups = list(cfg["config_groups"].values())
    if len(groups) != 1:
        return None
    group = groups[0]
    weights = group.get("weights") or {}
    fmt = group.get("format") or cfg.get("format")
    if (group.get("input_activations") is not None or weights.get("type") != "int"
            or weights.get("num_bits") != 8 or fmt != "pack-quantized"):
        return None
    if not weights.get("symmetric", True) or weights.get("strategy") not in ("channel", "group"):
        return None
    return {"granularity": weights["strategy"], "group_size": weights.get("group_size"),
            "ignore": list(cfg.get("ignore") or [])}


class NormSwapInt8Config(QuantizationConfig):
    """Symmetric int8 weights (W8A16) for every dense linear layer; activations stay bf16/fp16."""

    def __init__(self, granularity: str = "channel", group_size: int | None = 128,
                 from_checkpoint: bool = False, ignore: list[str] | None = None, lm_head: bool = False):
        super().__init__()
        if not isinstance(lm_head, bool):
            raise QuantConfigError(f"normswap_int8: lm_head must be true or false, got {lm_head!r}")
        check_granularity(granularity, group_size)
        if from_checkpoint and granularity == "tensor":  # compressed-tensors stores per-tensor as equal channels
            raise QuantConfigError("normswap_int8: a checkpoint cannot declare granularity 'tensor'")
        self.granularity = granularity
        self.group_size = group_size if granularity == "group" else None
        self.from_checkpoint = from_checkpoint  # True: weights arrive as int8 + scales; False: quantize on load
        self.ignore = list(ignore or [])
        self.lm_head = lm_head  # also quantize an untied ParallelLMHead (online, CPU)

    def __repr__(self) -> str:
        return (f"NormSwapInt8Config(granularity={self.granularity!r}, group_size={self.group_size}, "
                f"from_checkpoint={self.from_checkpoint}, lm_head={self.lm_head})")

    # ---- QuantizationConfig interface ----
    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # GPU path: Marlin/Machete via vLLM's kernel chooser (Turing and up)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # no side file: config.json's quantization_config, or nothing (online)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NormSwapInt8Config":
        ct = parse_compressed_tensors_w8a16(config)
        if ct is not None:
            return cls(ct["granularity"], ct["group_size"], from_checkpoint=True, ignore=ct["ignore"])
        if config.get("quant_method") == "compressed-tensors":
            raise QuantConfigError(
                "normswap_int8 serves compressed-tensors checkpoints only in the int8 weight-only layout "
                "(one config group, weights type int, num_bits 8, symmetric, strategy channel|group, "
                "input_activations null, format pack-quantized); write one with `normswap quantize`")
        unknown = set(config) - _ONLINE_KEYS
        if unknown:
            raise QuantConfigError(
                f"normswap_int8: unknown quantization_config field(s) {sorted(unknown)}; allowed: "
                f"granularity ({'|'.join(GRANULARITIES)}), group_size, lm_head (true|false)")
        return cls(config.get("granularity", "channel"), config.get("group_size", 128),
                   lm_head=config.get("lm_head", False))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        if hf_quant_cfg.get("quant_method") == NAME:
            return NAME
        if parse_compressed_tensors_w8a16(hf_quant_cfg) is None:
            return None
        # Stock vLLM has no CPU kernel for compressed-tensors W8A16 ("Failed to find a kernel ... WNA16"):
        # claim it there; elsewhere only when asked for by name.
        if user_quant == NAME or (user_quant is None and current_platform.is_cpu()):
            return NAME
        return None

    def _ignored(self, prefix: str) -> bool:
        """compressed-tensors `ignore` (exact module names or `re:` patterns, checkpoint names), matched by vLLM's
        own compressed-tensors matcher (``compressed_tensors.utils.should_ignore_layer``: the fused name itself,
        else every shard of a merged layer such as qkv_proj / gate_up_proj through ``packed_modules_mapping``).
        A merged layer is ignored when all its shards are; some but not all is an error (one linear layer cannot
        be half int8)."""
        from vllm.model_executor.layers.quantization.compressed_tensors.utils import should_ignore_layer

        try:
            return should_ignore_layer(prefix, ignore=self.ignore, fused_mapping=self.packed_modules_mapping)
        except ValueError as err:
            shards = self.packed_modules_mapping.get(prefix.rsplit(".", 1)[-1], [])
            raise QuantConfigError(
                f"normswap_int8: the ignore list {self.ignore} names some but not all shards of the merged layer "
                f"{prefix} ({', '.join(shards)}); vLLM serves a merged layer in one precision, so ignore all of "
                f"them or none ({err})") from None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        # imported here: register() runs in every vLLM process; only model-loading processes need the layers
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        if isinstance(layer, ParallelLMHead) and self.lm_head and not self.from_checkpoint:
            if not current_platform.is_cpu():
                raise QuantConfigError("normswap_int8: lm_head: true is implemented on CPU only; drop it on GPU")
            from vllm_normswap.quant.linear_method import Int8LMHeadMethod

            return Int8LMHeadMethod(self, prefix)
        if not isinstance(layer, LinearBase):
            return None  # embeddings (and the LM head unless lm_head: true) stay in the model dtype
        if self._ignored(prefix):
            return UnquantizedLinearMethod()
        from vllm_normswap.quant.linear_method import CheckpointInt8LinearMethod, OnlineInt8LinearMethod

        method_cls = CheckpointInt8LinearMethod if self.from_checkpoint else OnlineInt8LinearMethod
        return method_cls(self, prefix)
