"""`normswap quantize SRC DST [--granularity channel|group|tensor] [--group-size 128]`: an int8 W8A16 checkpoint.

Output layout: compressed-tensors "pack-quantized" W8A16 (what llm-compressor writes for int8 weight-only), so the
same directory loads in stock vLLM on GPU (Machete/Marlin) and, through `normswap_int8`, on CPU:
  X.weight -> X.weight_packed (int32 [N, K/4], int8 + 128 packed along K), X.weight_scale ([N, 1] or [N, K/G],
  in the checkpoint dtype), X.weight_shape (int64 [N, K])
for every linear projection (2-D `*_proj.weight`: the layers vLLM builds as linear layers; embeddings, norms and
the LM head stay as they are). Per-tensor scales are stored as equal per-channel scales (compressed-tensors'
pack-quantized format has no per-tensor strategy), which is the same numbers.

The int8 values and scales come from the same primitives the online path uses (quant/primitives.py), on the
same bf16/fp16 tensors, so loading DST reproduces `--quantization normswap_int8` on SRC bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from vllm_normswap.quant.primitives import (
    GRANULARITIES,
    QuantConfigError,
    absmax,
    check_granularity,
    pack_int8_to_int32,
    quantize_with_scales,
    scales_from_absmax,
)

_INDEX = "model.safetensors.index.json"
_SKIP_FILES = {"config.json", _INDEX}


def is_quantized_linear(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and name.endswith("_proj.weight")


def quantize_tensor(weight: torch.Tensor, granularity: str, group_size: int | None):
    """(int8 q, 2-D scale in the tensor's dtype) exactly as the online path computes it for this tensor."""
    amax = absmax(weight, granularity, group_size)
    if granularity == "tensor":
        amax = amax.expand(weight.shape[0], 1)
    scale = scales_from_absmax(amax, weight.dtype)
    return quantize_with_scales(weight, scale), scale.contiguous()


def compressed_tensors_config(granularity: str, group_size: int | None) -> dict:
    strategy = "group" if granularity == "group" else "channel"
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "format": "pack-quantized",
            "input_activations": None,
            "output_activations": None,
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy,
                        "group_size": group_size if granularity == "group" else None, "dynamic": False,
                        "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {}},
        }},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def quantize_checkpoint(src, dst, granularity: str = "channel", group_size: int | None = 128) -> dict:
    """Write DST; returns a summary {quantized: n tensors, bytes_in, bytes_out}."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    check_granularity(granularity, group_size)
    src, dst = Path(src), Path(dst)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: SRC must be a checkpoint directory with config.json")
    config = json.loads(config_path.read_text())
    if config.get("quantization_config"):
        raise QuantConfigError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')});"
                               " quantize the full-precision checkpoint instead")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {src}")
    if dst.resolve() == src.resolve():
        raise ValueError("DST must differ from SRC")
    dst.mkdir(parents=True, exist_ok=True)
    summary = {"quantized": 0, "bytes_in": 0, "bytes_out": 0}
    weight_map: dict[str, str] = {}
    for f in files:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(f), framework="pt") as reader:  # one shard in memory at a time
            for name in reader.keys():
                t = reader.get_tensor(name)
                summary["bytes_in"] += t.numel() * t.element_size()
                if not is_quantized_linear(name, t):
                    out[name] = t
                    continue
                if not t.dtype.is_floating_point:
                    raise QuantConfigError(f"{name} has dtype {t.dtype}; expected a bf16/fp16/fp32 weight")
                try:
                    q, scale = quantize_tensor(t, granularity, group_size)
                except QuantConfigError as err:
                    raise QuantConfigError(f"{err} (tensor {name}, shape {tuple(t.shape)})") from None
                base = name.removesuffix(".weight")
                out[f"{base}.weight_packed"] = pack_int8_to_int32(q)
                out[f"{base}.weight_scale"] = scale
                out[f"{base}.weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
                summary["quantized"] += 1
        summary["bytes_out"] += sum(t.numel() * t.element_size() for t in out.values())
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
        weight_map.update({name: f.name for name in out})
    if summary["quantized"] == 0:
        raise QuantConfigError(f"no linear projection (2-D '*_proj.weight') found in {src}; nothing to quantize")
    for extra in src.iterdir():  # tokenizer, generation config, index file ...
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in _SKIP_FILES:
            shutil.copy2(extra, dst / extra.name)
    if (src / _INDEX).is_file():  # sharded checkpoint: the index must name the new tensors
        index = json.loads((src / _INDEX).read_text())
        index["weight_map"] = weight_map
        (dst / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config["quantization_config"] = compressed_tensors_config(granularity, group_size)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return summary


def add_arguments(p) -> None:
    p.add_argument("src", help="full-precision checkpoint directory (config.json + *.safetensors)")
    p.add_argument("dst", help="output directory for the int8 (compressed-tensors W8A16) checkpoint")
    p.add_argument("--granularity", choices=GRANULARITIES, default="channel",
                   help="one scale per output channel, per group of inputs, or per tensor")
    p.add_argument("--group-size", type=int, default=128, help="inputs per scale with --granularity group")


def run(args) -> int:
    summary = quantize_checkpoint(args.src, args.dst, args.granularity, args.group_size)
    print(json.dumps({"checkpoint": str(args.dst), "granularity": args.granularity,
                      "group_size": args.group_size if args.granularity == "group" else None, **summary}))
    return 0
