"""`normswap convert` streams: shards are read tensor by tensor (safetensors.safe_open) and the output written
tensor by tensor, so peak memory is about the largest tensor, not the checkpoint.

The source is a Llama checkpoint written as a *sparse* safetensors file (header + a hole: all-zero tensors cost
no disk and no time to build). The conversion runs in a subprocess that reports its own peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which counts touched memory-mapped pages too) after importing
everything, and the rise during ``convert`` must stay under ``4 x largest tensor + 256 MiB`` (a cast copy, the
read, allocator slack) and under half the checkpoint. Loading all shards into memory, as convert used to, rises
by at least the checkpoint's size.

The first case is a 1.1 GB checkpoint (~5 s). The second is bigger than half of this machine's memory
(Llama-7B-shaped layers, enough of them), converted to bf16: on the 23 GB, 2-core box a 14.0 GB checkpoint,
~50 s, 7 GB written, peak RSS rise 937 MiB (the largest tensor is 500 MiB). It is skipped where the disk lacks
room for the output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MIB = 1 << 20

PROBE = r"""
import json, resource, sys
from vllm_normswap.checkpoints.convert import convert
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
arch = convert(sys.argv[1], sys.argv[2], dtype=sys.argv[3])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak, "layers": arch.num_hidden_layers}))
"""


def llama_shapes(V, D, L, F, kv=None):
    kv = kv or D
    shapes = {"model.embed_tokens.weight": (V, D)}
    for i in range(L):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
                   f"{p}.self_attn.q_proj.weight": (D, D), f"{p}.self_attn.k_proj.weight": (kv, D),
                   f"{p}.self_attn.v_proj.weight": (kv, D), f"{p}.self_attn.o_proj.weight": (D, D),
                   f"{p}.mlp.gate_proj.weight": (F, D), f"{p}.mlp.up_proj.weight": (F, D),
                   f"{p}.mlp.down_proj.weight": (D, F)}
    shapes |= {"model.norm.weight": (D,), "lm_head.weight": (V, D)}
    return shapes


def write_sparse_shards(out: Path, shapes: dict, n_shards: int) -> int:
    """fp32 safetensors shards whose data is a hole (zeros): header, then truncate to the full length."""
    names = list(shapes)
    per = -(-len(names) // n_shards)
    total = 0
    for j in range(n_shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names[j * per:(j + 1) * per]:
            n = 4
            for dim in shapes[name]:
                n *= dim
            header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
            offset += n
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        with open(out / f"model-{j + 1:05d}-of-{n_shards:05d}.safetensors", "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            f.truncate(8 + len(head) + offset)
        total += offset
    return total


def sparse_llama(out: Path, V, D, L, F, heads, n_shards) -> tuple[int, int]:
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
        "num_hidden_layers": L, "num_attention_heads": heads, "intermediate_size": F,
        "max_position_embeddings": 256, "torch_dtype": "float32", "tie_word_embeddings": False}))
    shapes = llama_shapes(V, D, L, F)
    largest = max(4 * (s[0] * (s[1] if len(s) > 1 else 1)) for s in shapes.values())
    return write_sparse_shards(out, shapes, n_shards), largest


def convert_and_measure(src: Path, dst: Path, dtype: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, str(src), str(dst), dtype], capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no tokenizer files" in r.stderr  # the warning goes to stderr; stdout is the probe's JSON alone
    return json.loads(r.stdout)


def check(src, dst, size, largest, dtype, expected_out_bytes, down_shape):
    m = convert_and_measure(src, dst, dtype)
    rise = m["peak"] - m["base"]
    print(f"checkpoint {size / 1e9:.2f} GB, largest tensor {largest / MIB:.0f} MiB: peak RSS rise "
          f"{rise / MIB:.0f} MiB (base {m['base'] / MIB:.0f} MiB)")
    assert rise < 4 * largest + 256 * MIB, rise
    assert rise < size / 2, rise
    assert (dst / "model.safetensors").stat().st_size >= expected_out_bytes
    from safetensors import safe_open

    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert "model.layers.0.mlp.gate_proj.weight" in names and "lm_head.weight" in names
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == list(down_shape)
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_dtype() == ("BF16" if dtype == "bfloat16"
                                                                                   else "F32")


def test_convert_streams_a_1gb_checkpoint(tmp_path):
    size, largest = sparse_llama(tmp_path / "src", V=8000, D=1024, L=20, F=2816, heads=16, n_shards=4)
    assert size > 1e9
    try:
        check(tmp_path / "src", tmp_path / "dst", size, largest, "auto", size, (1024, 2816))
    finally:
        shutil.rmtree(tmp_path / "dst", ignore_errors=True)


def test_convert_streams_a_checkpoint_bigger_than_half_the_memory(tmp_path):
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_layer = 4 * (4 * 4096 * 4096 + 3 * 11008 * 4096)
    layers = int(mem / 2 // per_layer) + 1
    need_disk = layers * per_layer // 2 + (2 << 30)  # the bf16 output is written for real
    if os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize < need_disk:
        pytest.skip(f"needs {need_disk / 1e9:.0f} GB free disk for the output")
    size, largest = sparse_llama(tmp_path / "src", V=32000, D=4096, L=layers, F=11008, heads=32,
                                 n_shards=max(2, layers // 4))
    assert size > mem / 2
    try:
        check(tmp_path / "src", tmp_path / "dst", size, largest, "bfloat16", size // 2, (4096, 11008))
    finally:  # pytest keeps the last runs' tmp dirs: do not leave 7 GB behind
        shutil.rmtree(tmp_path / "dst", ignore_errors=True)
        shutil.rmtree(tmp_path / "src", ignore_errors=True)
