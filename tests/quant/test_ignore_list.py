"""normswap_int8's `ignore` list goes through vLLM's own compressed-tensors matcher: exact names and `re:`
patterns, merged layers (qkv_proj, gate_up_proj) ignored only when all their shards are, an error naming the layer
when only some are."""

from __future__ import annotations

import pytest

from vllm_normswap.quant.config import NormSwapInt8Config
from vllm_normswap.quant.primitives import QuantConfigError

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def config(ignore):
    cfg = NormSwapInt8Config("channel", None, from_checkpoint=True, ignore=ignore)
    cfg.packed_modules_mapping = dict(PACKED)  # what vLLM copies from the model (SupportsQuant)
    return cfg


def test_uses_vllms_matcher():
    import inspect

    src = inspect.getsource(NormSwapInt8Config._ignored)
    assert "should_ignore_layer" in src


def test_exact_names_and_regex():
    cfg = config(["lm_head", "model.layers.0.self_attn.o_proj", "re:.*layers\\.1\\.mlp\\.down_proj$"])
    assert cfg._ignored("lm_head")
    assert cfg._ignored("model.layers.0.self_attn.o_proj")
    assert not cfg._ignored("model.layers.1.self_attn.o_proj")
    assert cfg._ignored("model.layers.1.mlp.down_proj")
    assert not cfg._ignored("model.layers.0.mlp.down_proj")


def test_merged_layer_all_shards():
    cfg = config(["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                  "model.layers.0.self_attn.v_proj", "re:.*mlp\\.(gate|up)_proj$"])
    assert cfg._ignored("model.layers.0.self_attn.qkv_proj")
    assert not cfg._ignored("model.layers.1.self_attn.qkv_proj")
    assert cfg._ignored("model.layers.3.mlp.gate_up_proj")
    assert config(["model.layers.2.mlp.gate_up_proj"])._ignored("model.layers.2.mlp.gate_up_proj")  # fused name


@pytest.mark.parametrize("ignore,prefix", [
    (["model.layers.0.self_attn.q_proj"], "model.layers.0.self_attn.qkv_proj"),
    (["re:.*mlp\\.gate_proj$"], "model.layers.5.mlp.gate_up_proj"),
])
def test_merged_layer_some_shards_is_an_error(ignore, prefix):
    with pytest.raises(QuantConfigError, match=f"some but not all shards of the merged layer {prefix}"):
        config(ignore)._ignored(prefix)
