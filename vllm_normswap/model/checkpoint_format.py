"""The checkpoint format: which tensors a checkpoint directory holds (names and shapes from ``config.tensor_shapes``,
dtypes, the int8 layout), and the pre-flight checks of a directory before vLLM reads a weight. Every problem is
named (file, tensor, config field) together with its fix, instead of an opaque error deep in a loader, a hang, or
a server that serves garbage.

It lives in model/ because both sides use it: the vLLM model checks what it loads, and checkpoints/ (and
``normswap serve``) check what they write or are given. Layers point down: model/ imports nothing from
checkpoints/.

Two passes, split by cost:
- ``preflight(dir, arch)``: structure only. Reads the safetensors headers (a few KB per file, parsed here from the
  format's spec so that a truncated or corrupt file is reported with its name and the offending tensor), never a
  weight. Checks names, shapes, dtypes and the int8 (compressed-tensors W8A16) layout against ``tensor_shapes``.
- ``check_values(name, tensor)``: NaN / Inf weights and non-positive int8 scales, called by the vLLM model on each
  tensor as it streams through ``load_weights`` (so the weights are read once, not twice).

Only safetensors are accepted: a directory holding only pickle files (pytorch_model.bin, *.pt) is refused, since
unpickling runs arbitrary code. Imports no vLLM, so tests run it offline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import math
import os
import struct
from pathlib import Path

from vllm_normswap.model.config import NormSwapArch, tensor_shapes
from vllm_normswap.registry import ConfigError

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors dtype codes -> bytes per element (https://github.com/huggingface/safetensors, format spec)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
MAX_HEADER = 100_000_000  # the safetensors reference implementation's own limit
SHOW = 5  # problems listed per message; the rest are counted
RECOPY = "re-copy or re-export the checkpoint (the file is damaged)"


class CheckpointError(ConfigError):
    """A checkpoint directory that cannot be served. The message names file/tensor/field and the fix."""


def read_header(path: Path) -> dict[str, dict]:
    """Tensor entries of one safetensors file ({name: {dtype, shape, data_offsets}}), validated against the file
    size, so that truncation and corruption are found here, with the file and tensor named."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: {size} bytes, too short for a safetensors file; {RECOPY}")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path.name}: corrupt safetensors header (header length field {n}, file size "
                                  f"{size}); {RECOPY}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not valid JSON: {err}); {RECOPY}") from None
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
            nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: corrupt safetensors header entry for tensor {name!r} "
                                  f"({entry!r}); {RECOPY}") from None
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path.name}: tensor {name!r} {dtype}{shape} needs {nbytes} bytes but the header "
                                  f"gives offsets {begin}..{end}; corrupt header, {RECOPY}")
        if end > data_bytes:
            raise CheckpointError(f"{path.name}: truncated: tensor {name!r} ends at byte {end} of the data section "
                                  f"but the file holds only {data_bytes} data bytes; {RECOPY}")
    return header


def check_headers(model_dir: Path) -> None:
    """Every *.safetensors header of a directory is intact. Called when the checkpoint's config is loaded (in the
    API server, before vLLM itself reads the headers to guess dtypes and would fail with a bare UnicodeDecodeError)."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        read_header(path)


def weight_files(model_dir: Path) -> list[Path]:
    """The *.safetensors files to load; refuses a missing directory and a pickle-only checkpoint."""
    if not model_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {str(model_dir)!r} does not exist; pass --model DIR of a "
                              "checkpoint (config.json + *.safetensors + tokenizer), or build the embedded zoo "
                              "with `normswap zoo build`")
    files = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index names the files, and every one must be there
        try:
            named = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index.name}: unreadable ({err}); {RECOPY}") from None
        absent = [name for name in named if not (model_dir / name).is_file()]
        if absent:
            raise CheckpointError(f"{index.name} names shard(s) {absent} that are not in {model_dir}; copy the "
                                  "missing shards (or remove the stale index file)")
        files = [model_dir / name for name in named]
    if not files:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{model_dir} holds only pickle weights {pickles}: vllm-normswap loads safetensors only (unpickling "
                "runs arbitrary code). Convert once in a trusted environment: load the state dict and write it "
                "with safetensors.torch.save_file(state_dict, 'model.safetensors') (`normswap convert` does this for "
                "GPT-2/OPT/Llama sources)")
        raise CheckpointError(f"no *.safetensors weights in {model_dir}; a checkpoint directory holds config.json, "
                              "model.safetensors (or shards + model.safetensors.index.json) and tokenizer files")
    return files


def check_model_path(model: str) -> None:
    """Before vLLM starts: a --model that is meant as a local path (absolute, ./, ../, or more than one '/') must
    be a directory. vLLM would otherwise take it for a Hugging Face repo id and fail with "Repo id must be in the
    form 'repo_name' or 'namespace/repo_name'", which does not say that the directory is missing."""
    local = os.path.isabs(model) or model.startswith(("./", "../", "~")) or model.count("/") > 1
    if local and not Path(model).expanduser().is_dir():
        weight_files(Path(model).expanduser())  # raises, naming the directory and the fix


def int8_layout(config: dict) -> tuple[str, int | None] | None:
    """(strategy, group_size) of a compressed-tensors int8 weight-only checkpoint (`normswap quantize`), else None:
    then linear weights are stored in full precision."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        return None
    groups = list((qc.get("config_groups") or {}).values())
    weights = (groups[0].get("weights") or {}) if len(groups) == 1 else {}
    return weights.get("strategy"), weights.get("group_size")


def expected_tensors(arch: NormSwapArch, layout: tuple[str, int | None] | None) -> dict[str, tuple[tuple, set]]:
    """name -> (shape, allowed safetensors dtypes); linear weights in the packed int8 layout when ``layout``."""
    out = {}
    for name, shape in tensor_shapes(arch).items():
        if layout is None or not (name.endswith("_proj.weight") and len(shape) == 2):
            out[name] = (shape, FLOAT_DTYPES)
            continue
        (rows, cols), (strategy, group) = shape, layout
        base = name.removesuffix(".weight")
        scale_cols = cols // group if strategy == "group" and group else 1
        out[f"{base}.weight_packed"] = ((rows, cols // 4), {"I32"})
        out[f"{base}.weight_scale"] = ((rows, scale_cols), FLOAT_DTYPES)
        out[f"{base}.weight_shape"] = ((2,), {"I64", "I32"})
    return out


def _listing(items: list[str]) -> str:
    more = f" (and {len(items) - SHOW} more)" if len(items) > SHOW else ""
    return ", ".join(items[:SHOW]) + more


def _describe(arch: NormSwapArch) -> str:
    return (f"hidden_size={arch.hidden_size}, intermediate_size={arch.intermediate_size}, num_hidden_layers="
            f"{arch.num_hidden_layers}, vocab_size={arch.vocab_size}, norm_type={arch.norm_type!r}, ffn_act="
            f"{arch.ffn_act!r}, tie_word_embeddings={arch.tie_word_embeddings}")


def preflight(model_dir, arch: NormSwapArch, config: dict | None = None) -> list[Path]:
    """Raise CheckpointError naming every structural problem of ``model_dir`` for ``arch``; return its files."""
    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    if config is None:
        config = json.loads((model_dir / "config.json").read_text())
    layout = int8_layout(config)
    found: dict[str, tuple[str, list, str]] = {}
    for path in files:
        for name, entry in read_header(path).items():
            found[name] = (entry["dtype"], entry["shape"], path.name)
    expected = expected_tensors(arch, layout)
    if arch.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # some exporters write the tied head too; it is ignored
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{name} {list(shape)} in {file} (config.json implies {list(expected[name][0])})"
             for name, (_, shape, file) in sorted(found.items())
             if name in expected and tuple(shape) != expected[name][0]]
    bad_dtype = [f"{name} is {dtype} (expected {'/'.join(sorted(expected[name][1]))})"
                 for name, (dtype, _, _) in sorted(found.items())
                 if name in expected and dtype not in expected[name][1]]
    problems = []
    what = "int8 (compressed-tensors W8A16) " if layout else ""
    if missing:
        problems.append(f"missing tensor(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s), not part of a NormSwap {what}checkpoint with this config: "
                        f"{_listing(unexpected)}")
    if wrong:
        problems.append(f"tensor(s) with the wrong shape: {_listing(wrong)}")
    if bad_dtype:
        problems.append(f"tensor(s) with the wrong dtype: {_listing(bad_dtype)}")
    if not problems:
        return files
    if layout and (wrong or bad_dtype) and not (missing or unexpected):
        fix = ("the int8 scales/packed weights do not match the weights and quantization_config "
               f"(strategy {layout[0]!r}, group_size {layout[1]}); re-export the checkpoint with `normswap quantize "
               "SRC DST` from its full-precision source")
    else:
        fix = (f"the checkpoint's tensors and its config.json ({_describe(arch)}) disagree; fix config.json to "
               "describe these weights, or re-export the weights (tensor names and shapes: "
               "docs/checkpoint-format.md)")
    raise CheckpointError(f"checkpoint {model_dir.name!r} cannot be served: " + "; ".join(problems) + ". Fix: " + fix)


def check_values(name: str, tensor: "torch.Tensor") -> None:
    """Non-finite weights (NaN/Inf: a diverged training run or a broken conversion) and non-positive int8 scales
    make every output garbage without any error; refuse them by name."""
    import torch

    if not tensor.is_floating_point():
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        nan = int(torch.isnan(tensor).sum())
        inf = int(tensor.numel() - finite.sum()) - nan
        raise CheckpointError(f"checkpoint tensor {name!r} holds {nan} NaN and {inf} Inf value(s) of "
                              f"{tensor.numel()}; the weights are corrupt (diverged training or a broken "
                              "conversion): re-export them from a healthy training checkpoint")
    if name.endswith(".weight_scale") and not bool((tensor > 0).all()):
        raise CheckpointError(f"checkpoint tensor {name!r} has {int((tensor <= 0).sum())} non-positive int8 scale(s); "
                              "the scales do not match the weights: re-export with `normswap quantize SRC DST`")
