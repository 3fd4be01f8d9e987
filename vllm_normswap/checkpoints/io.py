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
