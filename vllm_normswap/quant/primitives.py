"""Symmetric int8 weight-only quantization math (W8A16): torch only, no vLLM.

One formula, used by the online path (quantize while vLLM loads), the offline path (`normswap quantize`) and the
tests, so the two paths agree bit for bit:

    amax  = max |W| over the scale's block (an output row, a group of `group_size` inputs of a row, or the tensor)
    scale = round_to(scale_dtype, amax / 127)          # rounded FIRST, so dequantization uses exactly this value
    q     = clamp(round_half_even(W / scale), -127, 127)  (computed in float32)
    W_hat = q * scale

The grid is symmetric (+-127, zero point 0; -128 is never produced), as in gpt-fast and the compressed-tensors
"int" symmetric scheme. Scales have shape [N, 1] (channel), [N, K // group_size] (group) or [1, 1] (tensor): the
same 2-D layout compressed-tensors stores.
"""

from __future__ import annotations

import sys

import torch

GRANULARITIES = ("channel", "group", "tensor")
QMAX = 127  # symmetric int8 grid: -127..127


class QuantConfigError(ValueError):
    """A quantization setting or checkpoint that cannot work; the message names the field and the fix."""


def check_granularity(granularity: str, group_size: int | None, input_size: int | None = None) -> None:
    """Validate once, with a message naming the bad field and the allowed values."""
    if granularity not in GRANULARITIES:
        raise QuantConfigError(
            f"normswap_int8: unknown granularity {granularity!r}; allowed: {', '.join(GRANULARITIES)}")
    if granularity == "group":
        if not isinstance(group_size, int) or group_size <= 0:
            raise QuantConfigError(
                f"normswap_int8: granularity 'group' needs a positive integer group_size, got {group_size!r}")
        if input_size is not None and input_size % group_size:
            raise QuantConfigError(
                f"normswap_int8: group_size {group_size} does not divide the layer input size {input_size}; "
                f"pick a group_size that divides every linear layer's input size (and its tensor-parallel "
                f"shard), e.g. 32, 64 or 128, or use granularity 'channel'")


def absmax(weight: torch.Tensor, granularity: str, group_size: int | None = None) -> torch.Tensor:
    """max |W| per scale block, float32, in the 2-D scale layout ([N,1] | [N,K/G] | [1,1])."""
    check_granularity(granularity, group_size, weight.shape[-1])
    w = weight.detach()
    if granularity == "channel":
        lo, hi = w.aminmax(dim=1, keepdim=True)
    elif granularity == "group":
        n, k = w.shape
        lo, hi = w.reshape(n, k // group_size, group_size).aminmax(dim=2)
    else:
        lo, hi = w.aminmax()
        lo, hi = lo.reshape(1, 1), hi.reshape(1, 1)
    return torch.maximum(lo.abs(), hi.abs()).float()


def scales_from_absmax(amax: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """scale = amax / 127, rounded to scale_dtype; an all-zero block gets the smallest normal number so that
    division stays finite (its q is 0 either way)."""
    scale = (amax.float() / QMAX).to(scale_dtype)
    return scale.clamp_min(torch.finfo(scale_dtype).tiny)


def _expand(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Broadcast a 2-D scale ([N,1], [N,G], [1,1]) to the weight shape [N, K]."""
    n, k = shape
    if scale.shape[1] in (1, k):
        return scale
    groups = scale.shape[1]
    if k % groups:
        raise QuantConfigError(
            f"normswap_int8: scale has {groups} groups per row, which does not divide the weight's {k} inputs")
    return scale.repeat_interleave(k // groups, dim=1)


def check_scale_shape(weight_shape: torch.Size, scale: torch.Tensor, name: str = "weight") -> None:
    """A checkpoint whose scales do not match its weights must fail at load, naming the tensor."""
    n, k = weight_shape
    ok = scale.dim() == 2 and scale.shape[0] in (1, n) and (scale.shape[1] >= 1 and k % scale.shape[1] == 0)
    if not ok:
        raise QuantConfigError(
            f"normswap_int8: {name}: scale shape {tuple(scale.shape)} does not match int8 weight shape "
            f"{(n, k)}; expected [{n}, 1] (per channel) or [{n}, {k}/group_size] (per group). Re-export the "
            f"checkpoint with `normswap quantize`")


def quantize_with_scales(weight: torch.Tensor, scale: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """q = clamp(round(W / scale), -127, 127) as int8, computed in float32 in row chunks (bounded temp memory)."""
    n, k = weight.shape
    out = torch.empty((n, k), dtype=torch.int8, device=weight.device)
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(n, start + chunk_rows))
        s = scale[rows] if scale.shape[0] == n else scale
        w = weight[rows].float()
        out[rows] = torch.round(w / _expand(s.float(), w.shape)).clamp_(-QMAX, QMAX).to(torch.int8)
    return out


def quantize(weight: torch.Tensor, granularity: str = "channel", group_size: int | None = None,
             scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [N, K] weight. Returns (int8 [N, K], scale in the 2-D layout, dtype scale_dtype or W's)."""
    if weight.dim() != 2:
        raise QuantConfigError(f"normswap_int8 quantizes 2-D linear weights, got shape {tuple(weight.shape)}")
    scale = scales_from_absmax(absmax(weight, granularity, group_size), scale_dtype or weight.dtype)
    return quantize_with_scales(weight, scale), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W_hat = q * scale (in float32, then cast to dtype, default the scale's dtype)."""
    w = q.float() * _expand(scale.float(), q.shape)
    return w.to(dtype or scale.dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|W|^2 / |W - W_hat|^2) in dB (torchao's metric)."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


# ---- compressed-tensors "pack-quantized" storage: 4 int8 values per int32 along the input dim ----
# compressed-tensors shifts 8-bit values to unsigned (v + 128, vLLM calls it uint8b128) and packs element i of
# each group of 4 into bits 8i..8i+7; on a little-endian host that is a plain byte reinterpretation.

def pack_int8_to_int32(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> int32 [N, K/4] in compressed-tensors pack-quantized layout (K must be a multiple of 4)."""
    if sys.byteorder != "little":  # the view below assumes little-endian bytes
        raise RuntimeError("pack_int8_to_int32 needs a little-endian host")
    n, k = q.shape
    if k % 4:
        raise QuantConfigError(f"normswap_int8: input size {k} must be a multiple of 4 to pack int8 into int32")
    return (q.to(torch.int16) + 128).to(torch.uint8).contiguous().view(torch.int32).reshape(n, k // 4)


def unpack_int32_to_int8(packed: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Inverse of pack_int8_to_int32; k (the unpacked input size) defaults to 4 * packed columns."""
    if sys.byteorder != "little":
        raise RuntimeError("unpack_int32_to_int8 needs a little-endian host")
    n = packed.shape[0]
    u = packed.contiguous().view(torch.uint8).reshape(n, -1)
    if k is not None:
        u = u[:, :k]
    return (u.to(torch.int16) - 128).to(torch.int8)
