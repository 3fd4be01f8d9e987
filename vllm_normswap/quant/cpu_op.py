"""The CPU int8 matmul as one opaque custom op, ``torch.ops.normswap.int8_linear`` (cpu_dispatch.int8_linear).

Why a custom op: the right kernel depends on the number of rows M (decode vs prefill); inside an op that branch
is plain Python, invisible to torch.compile (no shape guards, no recompiles).
"""

from __future__ import annotations

import torch

from vllm_normswap.quant.cpu_dispatch import int8_linear


def _int8_linear_fake(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_LIB = torch.library.Library("normswap", "FRAGMENT")  # the project's one op namespace; must outlive the op


def _register() -> None:
    if hasattr(torch.ops.normswap, "int8_linear"):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op("int8_linear", int8_linear, mutates_args=[], fake_impl=_int8_linear_fake,
                              target_lib=_LIB, dispatch_key="CPU")


_register()


def apply_int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.normswap.int8_linear(x, weight, scale, bias)
