"""GPU path: hand the int8 weights to vLLM's mixed-precision kernel chooser (Machete on sm90, else Marlin).

UNTESTED here (the machines this was written on have no GPU). It mirrors vLLM 0.32's compressed-tensors W8A16
scheme (compressed_tensors_wNa16.py) exactly: the layer carries `weight_packed` (int32 [N, K/4], 8-bit values
offset by 128 = vLLM's `uint8b128`, packed along the input dim) and `weight_scale` ([N, 1] or [N, K/G]) with the
same vLLM parameter classes, so the chosen kernel's process_weights_after_loading repacks them the way it
repacks a stock compressed-tensors checkpoint.
"""

from __future__ import annotations

import torch
from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
from vllm.model_executor.parameter import ChannelQuantScaleParameter, GroupQuantScaleParameter, PackedvLLMParameter
from vllm.scalar_type import scalar_types

from vllm_normswap.quant.primitives import pack_int8_to_int32


def make_mp_kernel(*, input_size: int, output_size: int, input_size_per_partition: int,
                   output_size_per_partition: int, act_dtype: torch.dtype, group_size: int | None):
    """Choose and build the kernel; raises vLLM's own error when no kernel fits (e.g. too old a GPU)."""
    config = MPLinearLayerConfig(
        full_weight_shape=(input_size, output_size),
        partition_weight_shape=(input_size_per_partition, output_size_per_partition),
        weight_type=scalar_types.uint8b128,  # int8 + 128, symmetric: no zero points
        act_type=act_dtype,
        group_size=group_size or -1,  # -1 = one scale per output channel
        zero_points=False,
    )
    kernel_cls = choose_mp_linear_kernel(config)
    return kernel_cls(config, w_q_param_name="weight_packed", w_s_param_name="weight_scale")


def install_int8_for_kernel(layer: torch.nn.Module, kernel, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Register int8 weights + scales in compressed-tensors layout on `layer`, then let the kernel repack."""
    noop = lambda *args, **kwargs: None  # noqa: E731  (already loaded; the loader is never called again)
    packed = PackedvLLMParameter(data=pack_int8_to_int32(q), input_dim=1, output_dim=0, packed_dim=1,
                                 packed_factor=4, weight_loader=noop)
    if scale.shape[1] == 1:
        scale_param = ChannelQuantScaleParameter(data=scale.contiguous(), output_dim=0, weight_loader=noop)
    else:
        scale_param = GroupQuantScaleParameter(data=scale.contiguous(), output_dim=0, input_dim=1,
                                               weight_loader=noop)
    if "weight" in layer._parameters:
        del layer._parameters["weight"]
    layer.register_parameter("weight_packed", packed)
    layer.register_parameter("weight_scale", scale_param)
    kernel.process_weights_after_loading(layer)
