"""Read and write NormSwap checkpoint directories (config.json + model.safetensors + tokenizer files)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_normswap.model.config import NormSwapArch


def save_checkpoint(dst, arch: NormSwapArch, tensors: dict[str, torch.Tensor], dtype=torch.bfloat16,
                    extra_config: dict | None = None) -> Path:
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = {**arch.to_dict(), "torch_dtype": str(dtype).removeprefix("torch."), **(extra_config or {})}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def save_checkpoint_streaming(dst, arch: NormSwapArch, tensors, dtype=torch.bfloat16) -> Path:
    """As :func:`save_checkpoint`, but ``tensors`` maps each name of ``tensor_shapes(arch)`` to a zero-argument
    callable that returns the tensor; each is produced, cast and written one at a time, so peak memory is the
    largest tensor. The file is safetensors as ``safe_open`` reads it (8-byte header length, JSON header with
    dtype/shape/data_offsets, padded to 8 bytes; the data in header order)."""
    from vllm_normswap.model.config import tensor_shapes

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(arch)
    if set(tensors) != set(shapes):
        raise ValueError(f"tensors differ from the checkpoint format: {sorted(set(tensors) ^ set(shapes))[:5]}")
    item = torch.tensor([], dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        n = item
        for dim in shape:
            n *= dim
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = dst / "model.safetensors.partial"
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name, shape in shapes.items():
            t = tensors[name]().detach().to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)}, the checkpoint format says {tuple(shape)}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
    tmp.replace(dst / "model.safetensors")
    config = {**arch.to_dict(), "torch_dtype": str(dtype).removeprefix("torch.")}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst


def load_config(src) -> dict:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a NormSwap checkpoint directory holds config.json, "
                                "model.safetensors and tokenizer files")
    return json.loads(path.read_text())


def load_arch(src) -> NormSwapArch:
    return NormSwapArch.from_dict(load_config(src))


def load_tensors(src) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if not tensors:
        raise FileNotFoundError(f"no *.safetensors in {src}")
    return tensors


def load_reference(src, dtype=torch.float32):
    """The pure-torch reference model with a checkpoint's weights."""
    from vllm_normswap.model.reference import ReferenceModel

    model = ReferenceModel(load_arch(src), dtype=dtype)
    model.load_checkpoint_tensors(load_tensors(src))
    return model.eval()
