"""Bad checkpoints and serving configs, each made from a good random checkpoint by one edit, with the words its
error message must contain: the tensor / field / file it names, and the fix it gives.

Shared by the offline validator tests and the server start-up tests; the table in docs/troubleshooting.md comes from the
server tests' messages (``python tests/robustness/bad_checkpoints.py`` prints the case list).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

OPTION = "ln-gelu"  # the good checkpoint's option (tests/utils.py OPTION_VARIANTS: learned positions, biases, tied)
WEIGHTS = "model.safetensors"


@dataclass
class Case:
    name: str
    what: str  # the first column of docs/troubleshooting.md's table
    make: Callable[[Path, Path], Path]  # (good checkpoint, work dir) -> model dir to serve
    expect: list[str]  # substrings of the error message: what it names, and the fix
    serve_option: str = OPTION  # serving config to start with (expect_option case: another one)
    extra_argv: list[str] = field(default_factory=list)


def _copy(src: Path, work: Path) -> Path:
    dst = work / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_config(**changes):
    def make(src: Path, work: Path) -> Path:
        dst = _copy(src, work)
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(changes)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
        return dst
    return make


def _edit_tensors(edit: Callable[[dict], None]):
    def make(src: Path, work: Path) -> Path:
        dst = _copy(src, work)
        tensors = load_file(str(dst / WEIGHTS))
        edit(tensors)
        save_file(tensors, str(dst / WEIGHTS), metadata={"format": "pt"})
        return dst
    return make


def _poke(name: str, value: float):
    def edit(t):
        t[name] = t[name].clone()
        t[name].view(-1)[7] = value
    return edit


def _truncate(src: Path, work: Path) -> Path:
    dst = _copy(src, work)
    path = dst / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # an interrupted copy
    return dst


def _corrupt_header(src: Path, work: Path) -> Path:
    dst = _copy(src, work)
    path = dst / WEIGHTS
    data = bytearray(path.read_bytes())
    data[8:24] = b"\x00\xff" * 8  # bytes of the JSON header overwritten (disk / transfer damage)
    path.write_bytes(bytes(data))
    return dst


def _pickle_only(src: Path, work: Path) -> Path:
    dst = _copy(src, work)
    tensors = load_file(str(dst / WEIGHTS))
    (dst / WEIGHTS).unlink()
    torch.save(tensors, dst / "pytorch_model.bin")
    return dst


def _int8(edit: Callable[[dict], None]):
    def make(src: Path, work: Path) -> Path:
        from vllm_normswap.checkpoints.quantize import quantize_checkpoint

        dst = work / "int8"
        quantize_checkpoint(src, dst, "channel")
        tensors = load_file(str(dst / WEIGHTS))
        edit(tensors)
        save_file(tensors, str(dst / WEIGHTS), metadata={"format": "pt"})
        return dst
    return make


def _half_rows(name: str):
    def edit(t):
        t[name] = t[name][: t[name].shape[0] // 2].clone()  # scales of another (smaller) layer
    return edit


def _negate(name: str):
    def edit(t):
        t[name] = -t[name]
    return edit


L0, L1 = "model.layers.0", "model.layers.1"
CASES = [
    Case("bad_norm_type", "unknown `norm_type` in config.json", _edit_config(norm_type="batchnorm"),
         ["'norm_type'", "'batchnorm'", "allowed values", "Fix config.json"]),
    Case("bad_ffn_act", "unknown `ffn_act` in config.json", _edit_config(ffn_act="geglu"),
         ["'ffn_act'", "'geglu'", "allowed values", "Fix config.json"]),
    Case("missing_tensor", "missing tensor", _edit_tensors(lambda t: t.pop(f"{L1}.mlp.down_proj.weight")),
         ["missing tensor", f"{L1}.mlp.down_proj.weight", "Fix:"]),
    Case("extra_tensor", "unexpected (extra) tensor",
         _edit_tensors(lambda t: t.update({f"{L0}.mlp.extra_proj.weight": torch.zeros(4, 4)})),
         ["unexpected tensor", f"{L0}.mlp.extra_proj.weight", "Fix:"]),
    Case("misshapen_tensor", "tensor of the wrong shape",
         _edit_tensors(lambda t: t.update({f"{L0}.mlp.up_proj.weight": t[f"{L0}.mlp.up_proj.weight"][:256]})),
         ["wrong shape", f"{L0}.mlp.up_proj.weight", "Fix:"]),
    Case("nan_weights", "NaN in a weight", _edit_tensors(_poke(f"{L1}.mlp.up_proj.weight", float("nan"))),
         [f"{L1}.mlp.up_proj.weight", "NaN", "re-export"]),
    Case("inf_weights", "Inf in a weight", _edit_tensors(_poke("model.embed_tokens.weight", float("inf"))),
         ["model.embed_tokens.weight", "Inf", "re-export"]),
    Case("truncated_file", "truncated safetensors file", _truncate, [WEIGHTS, "truncated", "re-copy"]),
    Case("corrupt_header", "corrupt safetensors header", _corrupt_header,
         [WEIGHTS, "corrupt safetensors header", "re-copy"]),
    Case("int8_scale_shape", "int8 scales of another shape than the weights (edited `normswap quantize` output)",
         _int8(_half_rows(f"{L0}.self_attn.q_proj.weight_scale")),
         [f"{L0}.self_attn.q_proj.weight_scale", "scales", "normswap quantize"]),
    Case("int8_scale_sign", "int8 scales <= 0 (edited `normswap quantize` output)",
         _int8(_negate(f"{L1}.mlp.down_proj.weight_scale")),
         [f"{L1}.mlp.down_proj.weight_scale", "non-positive", "normswap quantize"]),
    Case("option_mismatch", "serving config of option rms-gelu, checkpoint of option ln-gelu",
         lambda src, work: src, ["'rms-gelu'", "option 'ln-gelu'", "serving_configs/ln-gelu.yaml"],
         serve_option="rms-gelu"),
    Case("missing_dir", "checkpoint directory that does not exist", lambda src, work: work / "no-such-ckpt",
         ["no-such-ckpt", "does not exist", "--model"]),
    Case("pickle_only", "only pytorch_model.bin (pickle), no safetensors", _pickle_only,
         ["pytorch_model.bin", "safetensors only", "save_file"]),
]
BY_NAME = {case.name: case for case in CASES}

if __name__ == "__main__":
    for case in CASES:
        print(f"{case.name:18s} {case.what}")
