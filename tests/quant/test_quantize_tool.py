"""`normswap quantize` (checkpoints/quantize.py) without vLLM: layout, values, config accepted by the
compressed-tensors library itself, and clear failures."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_normswap.checkpoints.files import load_tensors
from vllm_normswap.checkpoints.quantize import quantize_checkpoint
from vllm_normswap.quant.config import NormSwapInt8Config
from vllm_normswap.quant.primitives import QuantConfigError, quantize, unpack_int32_to_int8


@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_layout_and_values(checkpoints, tmp_path, granularity):
    src = checkpoints["rms-gelu"]  # hidden 128, FFN 512: group 64 divides every input size
    summary = quantize_checkpoint(src, tmp_path / "q", granularity, 64)
    before, after = load_tensors(src), load_file(str(tmp_path / "q" / "model.safetensors"))
    linear = [n for n, t in before.items() if t.dim() == 2 and n.endswith("_proj.weight")]
    assert summary["quantized"] == len(linear) == 12  # 2 layers x (q, k, v, o, up, down)
    for name in linear:
        base = name.removesuffix(".weight")
        assert name not in after
        w = before[name]
        q_ref, s_ref = quantize(w, granularity, 64)
        assert torch.equal(unpack_int32_to_int8(after[f"{base}.weight_packed"]), q_ref)
        assert torch.equal(after[f"{base}.weight_scale"], s_ref.expand(w.shape[0], -1) if granularity == "tensor"
                           else s_ref)
        assert after[f"{base}.weight_shape"].tolist() == list(w.shape)
    for name, t in before.items():  # everything else untouched
        if name not in linear:
            assert torch.equal(after[name], t), name
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    ct = pytest.importorskip("compressed_tensors")
    parsed = ct.QuantizationConfig.model_validate(cfg)  # the format's own schema accepts it
    assert parsed.format == "pack-quantized"
    ours = NormSwapInt8Config.from_config(cfg)
    assert ours.from_checkpoint and ours.granularity == ("group" if granularity == "group" else "channel")
    assert (tmp_path / "q" / "tokenizer.json").is_file()


def test_clear_failures(checkpoints, tmp_path):
    src = checkpoints["rms-gelu"]
    with pytest.raises(QuantConfigError, match="group_size 96 does not divide the layer input size"):
        quantize_checkpoint(src, tmp_path / "a", "group", 96)
    quantize_checkpoint(src, tmp_path / "b", "channel")
    with pytest.raises(QuantConfigError, match="already quantized"):
        quantize_checkpoint(tmp_path / "b", tmp_path / "c", "channel")
    with pytest.raises(QuantConfigError, match="unknown granularity 'row'"):
        NormSwapInt8Config.from_config({"quant_method": "normswap_int8", "granularity": "row"})
    with pytest.raises(QuantConfigError, match="unknown quantization_config field"):
        NormSwapInt8Config.from_config({"quant_method": "normswap_int8", "granularty": "group"})
