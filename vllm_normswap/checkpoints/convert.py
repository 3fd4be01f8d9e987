"""`normswap convert SRC DST [--to-rmsnorm]`: Hugging Face GPT-2 / OPT (pre-LN) / Llama checkpoints -> NormSwap.

Tensor maps follow each transformers modeling file: GPT-2 stores Conv1D weights as [in, out] (transposed here) with
q/k/v fused in c_attn; OPT's learned positions start at row 2 (its offset); Llama's names already match ours.
A NormSwap checkpoint as SRC is accepted too (useful with --to-rmsnorm, e.g. on the zoo's ln-* models).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from vllm_normswap.model.config import NormSwapArch
from vllm_normswap.registry import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json")
_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _act(name: str, model: str) -> str:
    if name not in _ACTS:
        raise ConfigError(f"{model}: activation_function {name!r} is not supported; supported: {sorted(_ACTS)}")
    return _ACTS[name]


def load_hf_tensors(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for f in ([] if tensors else sorted(src.glob("pytorch_model*.bin"))):
        tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    if not tensors:
        raise FileNotFoundError(f"{src}: no *.safetensors or pytorch_model*.bin weights")
    return tensors


def convert_gpt2(cfg: dict, t: dict) -> tuple[NormSwapArch, dict]:
    for field, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if cfg.get(field, ok) != ok:
            raise ConfigError(f"GPT-2 config {field}={cfg[field]!r} is not supported (only {ok!r})")
    d, L = cfg["n_embd"], cfg["n_layer"]
    arch = NormSwapArch(vocab_size=cfg["vocab_size"], hidden_size=d, num_hidden_layers=L,
                        num_attention_heads=cfg["n_head"], intermediate_size=cfg.get("n_inner") or 4 * d,
                        max_position_embeddings=cfg["n_positions"], norm_type="layernorm",
                        ffn_act=_act(cfg.get("activation_function", "gelu_new"), "GPT-2"),
                        norm_eps=cfg.get("layer_norm_epsilon", 1e-5), norm_eps_placement="inside_sqrt",
                        tie_word_embeddings=cfg.get("tie_word_embeddings", True))
    p = "transformer." if "transformer.wte.weight" in t else ""
    out = {"model.embed_tokens.weight": t[f"{p}wte.weight"], "model.embed_positions.weight": t[f"{p}wpe.weight"]}
    for i in range(L):
        h, o = f"{p}h.{i}", f"model.layers.{i}"
        for src, dst in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            out[f"{o}.{dst}.weight"], out[f"{o}.{dst}.bias"] = t[f"{h}.{src}.weight"], t[f"{h}.{src}.bias"]
        qkv_w, qkv_b = t[f"{h}.attn.c_attn.weight"].t(), t[f"{h}.attn.c_attn.bias"]  # Conv1D: [in, out]
        for name, w, b in zip("qkv", qkv_w.split(d, 0), qkv_b.split(d, 0)):
            out[f"{o}.self_attn.{name}_proj.weight"], out[f"{o}.self_attn.{name}_proj.bias"] = w, b
        for src, dst in (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
                         ("mlp.c_proj", "mlp.down_proj")):
            out[f"{o}.{dst}.weight"], out[f"{o}.{dst}.bias"] = t[f"{h}.{src}.weight"].t(), t[f"{h}.{src}.bias"]
    out["model.norm.weight"], out["model.norm.bias"] = t[f"{p}ln_f.weight"], t[f"{p}ln_f.bias"]
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = t["lm_head.weight"]
    return arch, out


def convert_opt(cfg: dict, t: dict) -> tuple[NormSwapArch, dict]:
    d = cfg["hidden_size"]
    if not cfg.get("do_layer_norm_before", True):
        raise ConfigError("OPT with do_layer_norm_before=false is post-LayerNorm (e.g. opt-350m); NormSwap is a "
                          "pre-norm decoder, so it cannot be converted exactly")
    if cfg.get("word_embed_proj_dim", d) != d:
        raise ConfigError(f"OPT word_embed_proj_dim {cfg['word_embed_proj_dim']} != hidden_size {d} needs "
                          "project_in/project_out layers, which NormSwap does not have")
    if cfg.get("_remove_final_layer_norm") or not cfg.get("layer_norm_elementwise_affine", True):
        raise ConfigError("OPT without a final LayerNorm or without LayerNorm affine parameters is not supported")
    bias = cfg.get("enable_bias", True)
    arch = NormSwapArch(vocab_size=cfg["vocab_size"], hidden_size=d, num_hidden_layers=cfg["num_hidden_layers"],
                        num_attention_heads=cfg["num_attention_heads"], intermediate_size=cfg["ffn_dim"],
                        max_position_embeddings=cfg["max_position_embeddings"],
                        ffn_act=_act(cfg.get("activation_function", "relu"), "OPT"), norm_eps=1e-5,
                        norm_eps_placement="inside_sqrt", attention_bias=bias, mlp_bias=bias,
                        tie_word_embeddings=cfg.get("tie_word_embeddings", True))
    p = "model.decoder" if "model.decoder.embed_tokens.weight" in t else "decoder"
    out = {"model.embed_tokens.weight": t[f"{p}.embed_tokens.weight"],
           # OPTLearnedPositionalEmbedding looks up position + 2 (rows 0, 1 are a fairseq legacy)
           "model.embed_positions.weight": t[f"{p}.embed_positions.weight"][2:]}
    names = [("self_attn_layer_norm", "input_layernorm"), ("final_layer_norm", "post_attention_layernorm"),
             ("self_attn.q_proj", "self_attn.q_proj"), ("self_attn.k_proj", "self_attn.k_proj"),
             ("self_attn.v_proj", "self_attn.v_proj"), ("self_attn.out_proj", "self_attn.o_proj"),
             ("fc1", "mlp.up_proj"), ("fc2", "mlp.down_proj")]
    for i in range(arch.num_hidden_layers):
        for src, dst in names:
            for leaf in ("weight", "bias"):
                key = f"{p}.layers.{i}.{src}.{leaf}"
                if key in t:
                    out[f"model.layers.{i}.{dst}.{leaf}"] = t[key]
    out["model.norm.weight"], out["model.norm.bias"] = t[f"{p}.final_layer_norm.weight"], t[f"{p}.final_layer_norm.bias"]
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = t["lm_head.weight"]
    return arch, out


def convert_llama(cfg: dict, t: dict) -> tuple[NormSwapArch, dict]:
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"Llama hidden_act {cfg['hidden_act']!r}: only silu (SwiGLU) is supported")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(f"Llama rope scaling {rope!r} is not supported (only plain RoPE)")
    if cfg.get("sliding_window") not in (None, 0) and cfg["sliding_window"] < cfg["max_position_embeddings"]:
        raise ConfigError(f"sliding_window {cfg['sliding_window']} attention is not supported")
    heads = cfg["num_attention_heads"]
    arch = NormSwapArch(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
                        num_key_value_heads=cfg.get("num_key_value_heads") or heads, head_dim=cfg.get("head_dim"),
                        intermediate_size=cfg["intermediate_size"],
                        max_position_embeddings=cfg["max_position_embeddings"], norm_type="rmsnorm",
                        attn_norm_type="rmsnorm", final_norm_type="rmsnorm", ffn_act="swiglu",
                        norm_eps=cfg.get("rms_norm_eps", 1e-6), norm_eps_placement="inside_sqrt", norm_bias=False,
                        position_embedding_type="rope",
                        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                        attention_bias=cfg.get("attention_bias", False), mlp_bias=cfg.get("mlp_bias", False),
                        tie_word_embeddings=cfg.get("tie_word_embeddings", False))
    from vllm_normswap.model.config import tensor_shapes

    out = {name: t[name] for name in tensor_shapes(arch) if name in t}
    return arch, out


CONVERTERS = {"GPT2LMHeadModel": convert_gpt2, "OPTForCausalLM": convert_opt, "LlamaForCausalLM": convert_llama,
              "MistralForCausalLM": convert_llama}


def convert(src, dst, to_rmsnorm: bool = False, dtype: str = "auto") -> NormSwapArch:
    from vllm_normswap.checkpoints.io import load_config, save_checkpoint
    from vllm_normswap.model.config import tensor_shapes

    src, dst = Path(src), Path(dst)
    cfg = load_config(src)
    arch_name = (cfg.get("architectures") or ["?"])[0]
    tensors = load_hf_tensors(src)
    if cfg.get("model_type") == "normswap":
        arch = NormSwapArch.from_dict(cfg)
    elif arch_name in CONVERTERS:
        arch, tensors = CONVERTERS[arch_name](cfg, tensors)
    else:
        raise ConfigError(f"{src}: architecture {arch_name!r} is not supported; convert handles "
                          f"{', '.join(CONVERTERS)} and NormSwap checkpoints")
    missing = sorted(set(tensor_shapes(arch)) - set(tensors))
    if missing:
        raise ConfigError(f"{src}: checkpoint lacks tensors the mapped config needs: {missing[:5]}")
    tensors = {k: tensors[k] for k in tensor_shapes(arch)}
    if to_rmsnorm:
        from vllm_normswap.checkpoints.to_rmsnorm import to_rmsnorm as center

        arch, tensors = center(arch, tensors)
    out_dtype = tensors["model.embed_tokens.weight"].dtype if dtype == "auto" else getattr(torch, dtype)
    save_checkpoint(dst, arch, tensors, dtype=out_dtype)
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file() and not shutil.copy(src / f, dst / f) is None]
    if not any(f.startswith("tokenizer") for f in copied):
        print(f"warning: {src} has no tokenizer files; copy them into {dst} before serving it")
    return arch


def add_arguments(p) -> None:
    p.add_argument("src", help="Hugging Face checkpoint dir (GPT-2, OPT pre-LN, Llama) or a NormSwap checkpoint")
    p.add_argument("dst", help="output directory for the NormSwap checkpoint")
    p.add_argument("--to-rmsnorm", action="store_true",
                   help="exact LayerNorm -> RMSNorm by centering the residual stream (SliceGPT)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="dtype of the written weights (auto: as the source)")


def run(args) -> int:
    arch = convert(args.src, args.dst, args.to_rmsnorm, args.dtype)
    print(json.dumps({"checkpoint": args.dst, "option": arch.option, "config": arch.to_dict()}))
    return 0
