"""vLLM linear methods for `normswap_int8`: online (quantize while loading) and from a compressed-tensors checkpoint.

Both end in the same layer state, so an offline checkpoint reproduces the online result bit for bit:
  CPU: `weight` int8 [N, K] + `weight_scale` [N, 1] | [N, K/G] in the model dtype -> cpu_op.apply_int8_linear;
       the kernel plan for the shape is settled when the layer's weight is final (cpu_dispatch.prepare)
  GPU: compressed-tensors parameters handed to vLLM's mixed-precision kernel (gpu_kernel.py, untested here)

LM head (`lm_head: true`, CPU): Int8LMHeadMethod keeps vLLM's bf16 loading and quantizes per output channel after
loading; a head tied to the embedding table stays bf16 (the table is read as an embedding too).

Tensor parallel: vLLM's weight loaders shard the weight (column: output rows; row: input columns; merged
qkv / gate_up: per logical shard). Scales follow the unsharded tensor: a per-channel amax reduces over the input
dim, so on a row-parallel layer it is all-reduced (max) over the TP group; per-tensor amax is taken per logical
shard (q, k, v separately, matching the checkpoint's tensors) and all-reduced whenever the layer is sharded;
groups must not straddle a shard boundary, which is checked at load.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.layers.quantization.utils.quant_utils import amax_for_tp_weight_quant
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.model_executor.model_loader.reload.layerwise import initialize_online_processing
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
)
from vllm.platforms import current_platform

import vllm_normswap.quant.cpu_dispatch as cpu_dispatch
from vllm_normswap.logs import plugin_logger
from vllm_normswap.quant.primitives import (
    QuantConfigError,
    absmax,
    check_granularity,
    quantize,
    quantize_with_scales,
    scales_from_absmax,
    unpack_int32_to_int8,
)

logger = plugin_logger(__name__)  # under vLLM's "vllm" logger: see vllm_normswap.logs


class _Int8LinearMethod(LinearMethodBase):
    """Shared shape bookkeeping, validation, and apply()."""

    def __init__(self, quant_config, prefix: str):
        self.quant_config = quant_config
        self.prefix = prefix
        self.gpu_kernel = None  # set on CUDA/ROCm: vLLM MPLinearKernel

    def _setup(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
               params_dtype) -> None:
        cfg = self.quant_config
        layer.logical_widths = list(output_partition_sizes)
        layer.input_size_per_partition = input_size_per_partition
        layer.output_size_per_partition = sum(output_partition_sizes)
        layer.normswap_row_sharded = input_size_per_partition != input_size
        layer.normswap_col_sharded = layer.output_size_per_partition != output_size
        try:
            check_granularity(cfg.granularity, cfg.group_size, input_size)
            check_granularity(cfg.granularity, cfg.group_size, input_size_per_partition)
        except QuantConfigError as err:
            raise QuantConfigError(f"{err} (layer {self.prefix}: input size {input_size}, "
                                   f"{input_size_per_partition} per tensor-parallel shard)") from None
        if current_platform.is_cuda_alike():
            from vllm_normswap.quant.gpu_kernel import make_mp_kernel

            self.gpu_kernel = make_mp_kernel(
                input_size=input_size, output_size=output_size,
                input_size_per_partition=input_size_per_partition,
                output_size_per_partition=layer.output_size_per_partition,
                act_dtype=params_dtype, group_size=cfg.group_size)
        elif not current_platform.is_cpu():
            raise QuantConfigError(f"normswap_int8 runs on CPU and CUDA/ROCm GPUs, not on "
                                   f"{current_platform.device_name}; drop --quantization normswap_int8")

    def _install(self, layer: torch.nn.Module, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Final layer state from int8 q [N_pp, K_pp] and scale [N_pp, 1 | K_pp/G]."""
        for name in ("weight", "weight_packed", "weight_scale", "weight_shape"):
            if name in layer._parameters:
                del layer._parameters[name]
        if self.gpu_kernel is not None:
            from vllm_normswap.quant.gpu_kernel import install_int8_for_kernel

            install_int8_for_kernel(layer, self.gpu_kernel, q, scale)
            return
        layer.register_parameter("weight", torch.nn.Parameter(q.contiguous(), requires_grad=False))
        layer.register_parameter("weight_scale", torch.nn.Parameter(scale.contiguous(), requires_grad=False))
        cpu_dispatch.prepare(layer.weight, layer.weight_scale, scale.dtype)  # the kernel plan, before any forward

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.gpu_kernel is not None:
            return self.gpu_kernel.apply_weights(layer, x, bias)
        from vllm_normswap.quant.cpu_op import apply_int8_linear

        return apply_int8_linear(x, layer.weight, layer.weight_scale, bias)


@register_weight_loader_v2_supported_method
class OnlineInt8LinearMethod(_Int8LinearMethod):
    """Weights are created on the meta device; vLLM's layerwise loader materialises one layer at a time and
    calls process_weights_after_loading as soon as that layer is complete, so the full-precision model is never
    resident as a whole (vLLM's online fp8 pattern, quantization/online/fp8.py)."""

    uses_meta_device = True

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        self._setup(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                    params_dtype)
        weight = ModelWeightParameter(
            data=torch.empty(layer.output_size_per_partition, input_size_per_partition, device="meta",
                             dtype=params_dtype),
            input_dim=1, output_dim=0, weight_loader=extra_weight_attrs.get("weight_loader"))
        layer.register_parameter("weight", weight)
        initialize_online_processing(layer)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "_already_called_process_weights_after_loading", False):
            return
        weight = layer.weight
        if weight.is_meta:  # never materialised (not in the checkpoint): vLLM reports the missing tensor
            return
        cfg = self.quant_config
        if cfg.granularity == "tensor":
            # one amax per logical shard (q/k/v, gate/up): the checkpoint's tensors
            amax = torch.stack([absmax(part, "tensor").reshape(()) for part in
                                weight.detach().split(layer.logical_widths, dim=0)])
            amax = amax_for_tp_weight_quant(amax, layer.normswap_row_sharded or layer.normswap_col_sharded)
            widths = torch.tensor(layer.logical_widths, device=amax.device)
            amax = amax.repeat_interleave(widths).unsqueeze(1)
        else:
            amax = absmax(weight, cfg.granularity, cfg.group_size)
            if cfg.granularity == "channel":
                amax = amax_for_tp_weight_quant(amax.contiguous(), layer.normswap_row_sharded)
        scale = scales_from_absmax(amax, weight.dtype)
        q = quantize_with_scales(weight, scale)
        self._install(layer, q, scale)
        layer._already_called_process_weights_after_loading = True


@register_weight_loader_v2_supported_method
class CheckpointInt8LinearMethod(_Int8LinearMethod):
    """Loads compressed-tensors W8A16 pack-quantized tensors: `weight_packed`, `weight_scale`, `weight_shape`."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        self._setup(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                    params_dtype)
        if input_size_per_partition % 4:
            raise QuantConfigError(f"normswap_int8: {self.prefix}: input size per shard "
                                   f"{input_size_per_partition} is not a multiple of 4 (int8 packed in int32)")
        loader = extra_weight_attrs.get("weight_loader")
        cfg = self.quant_config
        n = layer.output_size_per_partition
        full_scale_cols = input_size // cfg.group_size if cfg.granularity == "group" else 1
        packed = PackedvLLMParameter(
            data=torch.empty(n, input_size_per_partition // 4, dtype=torch.int32), input_dim=1, output_dim=0,
            packed_dim=1, packed_factor=4,
            weight_loader=self._checked(loader, "weight_packed", input_size // 4, torch.int32))
        scale_data = torch.full((n, input_size_per_partition // cfg.group_size if cfg.granularity == "group"
                                 else 1), float("nan"), dtype=params_dtype)
        scale_loader = self._checked(loader, "weight_scale", full_scale_cols, None)
        if cfg.granularity == "group":
            scale = GroupQuantScaleParameter(data=scale_data, output_dim=0, input_dim=1, weight_loader=scale_loader)
        else:
            scale = ChannelQuantScaleParameter(data=scale_data, output_dim=0, weight_loader=scale_loader)
        shape = BasevLLMParameter(data=torch.full((2,), -1, dtype=torch.int64), weight_loader=loader)
        layer.register_parameter("weight_packed", packed)
        layer.register_parameter("weight_scale", scale)
        layer.register_parameter("weight_shape", shape)
        layer.normswap_input_size = input_size

    def _checked(self, loader, name: str, columns: int, dtype: torch.dtype | None):
        """Wrap vLLM's loader: a tensor of the wrong width or dtype fails with a message naming the layer,
        instead of an opaque shape assertion deep in the loader."""
        cfg = self.quant_config
        what = (f"granularity {cfg.granularity}" + (f", group_size {cfg.group_size}" if cfg.group_size else ""))

        def load(param, loaded_weight, *args, **kwargs):
            if loaded_weight.dim() != 2 or loaded_weight.shape[1] != columns or (
                    dtype is not None and loaded_weight.dtype != dtype):
                raise QuantConfigError(
                    f"normswap_int8: checkpoint tensor {self.prefix}.{name} has shape "
                    f"{tuple(loaded_weight.shape)} ({loaded_weight.dtype}); the quantization_config ({what}) "
                    f"needs [rows, {columns}]" + (f" {dtype}" if dtype else "") + ": the scales do not match the "
                    f"weights. Re-export the checkpoint with `normswap quantize`")
            return loader(param, loaded_weight, *args, **kwargs)

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if "weight_packed" not in layer._parameters:
            return  # already processed
        scale = layer.weight_scale.data
        if torch.isnan(scale).any() or (scale <= 0).any() or torch.isinf(scale).any():
            raise QuantConfigError(f"normswap_int8: {self.prefix}.weight_scale is missing or has non-positive / "
                                   f"non-finite entries; the checkpoint's scales do not match its weights")
        k_full = int(layer.weight_shape.data[1])
        if k_full not in (-1, layer.normswap_input_size):
            raise QuantConfigError(f"normswap_int8: {self.prefix}.weight_shape says {k_full} inputs, the model "
                                   f"layer has {layer.normswap_input_size}")
        q = unpack_int32_to_int8(layer.weight_packed.data, layer.input_size_per_partition)
        self._install(layer, q, scale.clone())


class Int8LMHeadMethod(UnquantizedEmbeddingMethod):
    """Untied ParallelLMHead in int8 (CPU): loaded in bf16 like the stock head, quantized per output (vocab) row
    after loading, applied with the same CPU op as the linear layers. Vocab-parallel sharding splits the rows,
    so per-row scales need no communication. The head is a few hundred MB at most: the bf16 copy held while
    loading is not the whole model."""

    def __init__(self, quant_config, prefix: str):
        self.quant_config = quant_config
        self.prefix = prefix
        self.tied = False

    def tie_weights(self, layer, embed_tokens):
        self.tied = True  # the table is also read by the embedding lookup: it stays in the model dtype
        return super().tie_weights(layer, embed_tokens)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.tied:
            logger.warning("normswap_int8: lm_head: true ignored for %s: it is tied to the embedding table",
                           self.prefix)
            return super().process_weights_after_loading(layer)
        if layer.weight.dtype == torch.int8:
            return  # already processed
        q, scale = quantize(layer.weight.data, "channel")
        del layer._parameters["weight"]
        layer.register_parameter("weight", torch.nn.Parameter(q.contiguous(), requires_grad=False))
        layer.register_parameter("weight_scale", torch.nn.Parameter(scale.contiguous(), requires_grad=False))
        cpu_dispatch.prepare(layer.weight, layer.weight_scale, scale.dtype)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.tied:
            return super().apply(layer, x, bias)
        from vllm_normswap.quant.cpu_op import apply_int8_linear

        return apply_int8_linear(x, layer.weight, layer.weight_scale, bias)

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"normswap_int8: {self.prefix} is an int8 LM head, not an embedding table")
