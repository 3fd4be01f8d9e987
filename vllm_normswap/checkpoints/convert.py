"""`normswap convert SRC DST [--to-rmsnorm]`: Hugging Face GPT-2 / OPT (pre-LN) / Llama checkpoints -> NormSwap.

Tensor maps follow each transformers modeling file: GPT-2 stores Conv1D weights as [in, out] (transposed here) with
q/k/v fused in c_attn; OPT's learned positions start at row 2 (its offset); Llama's names already match ours.
A NormSwap checkpoint as SRC is accepted too (useful with --to-rmsnorm, e.g. on the zoo's ln-* models).

The library does the reading: source configs come from ``transformers.AutoConfig.from_pretrained`` (its defaults
and its standardised ``rope_parameters``, not a hand-parsed config.json), and safetensors shards are opened with
``safetensors.safe_open`` and read one tensor at a time while the output is written tensor by tensor
(``io.save_checkpoint_streaming``): peak memory is about the largest tensor, not the checkpoint. ``--to-rmsnorm``
still holds the model in memory (its centering is computed in float64 over all tensors at once); legacy
``pytorch_model*.bin`` files are loaded whole (torch.load has no per-tensor reader).
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from collections.abc import Callable
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


class ShardReader:
    """Tensor names -> shard files of a checkpoint; ``reader[name]`` reads that one tensor with
    ``safetensors.safe_open``. Each read opens and closes its shard, so the shard's memory map (whose touched pages
    count as resident) is released after every tensor: peak RSS stays about one tensor. Legacy
    ``pytorch_model*.bin`` weights (no per-tensor reader) are loaded whole."""

    def __init__(self, src: Path):
        from safetensors import safe_open

        self._where: dict[str, str] = {}
        self._dtypes: dict[str, str] = {}
        self._eager: dict[str, torch.Tensor] = {}
        for f in sorted(Path(src).glob("*.safetensors")):
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    self._where[name] = str(f)
                    self._dtypes[name] = handle.get_slice(name).get_dtype()
        for f in ([] if self._where else sorted(Path(src).glob("pytorch_model*.bin"))):
            self._eager.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        if not self._where and not self._eager:
            raise FileNotFoundError(f"{src}: no *.safetensors or pytorch_model*.bin weights")

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self._eager

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name in self._eager:
            return self._eager[name]
        if name not in self._where:
            raise KeyError(name)
        with safe_open(self._where[name], framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)

    def keys(self):
        return [*self._where, *self._eager]

    def dtype(self, name: str) -> torch.dtype:
        if name in self._eager:
            return self._eager[name].dtype
        return _SAFETENSORS_DTYPES[self._dtypes[name]]


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}

Lazy = Callable[[], torch.Tensor]  # reads (and transforms) one source tensor when called


def _lazy(t: ShardReader, key: str, fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Lazy:
    if key not in t:
        raise KeyError(key)
    return functools.partial(_read, t, key, fn)


def _read(t: ShardReader, key: str, fn) -> torch.Tensor:
    x = t[key]
    return fn(x) if fn is not None else x


def load_hf_tensors(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint in memory (small checkpoints, tests). ``convert`` streams instead."""
    t = ShardReader(Path(src))
    return {name: t[name] for name in t.keys()}


def hf_config(src: Path) -> dict:
    """The source config as transformers reads it (AutoConfig: defaults filled in, rope settings standardised)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(src)).to_dict()


def convert_gpt2(cfg: dict, t: ShardReader) -> tuple[NormSwapArch, dict[str, Lazy]]:
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
    out = {"model.embed_tokens.weight": _lazy(t, f"{p}wte.weight"),
           "model.embed_positions.weight": _lazy(t, f"{p}wpe.weight")}
    for i in range(L):
        h, o = f"{p}h.{i}", f"model.layers.{i}"
        for src, dst in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            out[f"{o}.{dst}.weight"] = _lazy(t, f"{h}.{src}.weight")
            out[f"{o}.{dst}.bias"] = _lazy(t, f"{h}.{src}.bias")
        for j, name in enumerate("qkv"):  # q/k/v fused in c_attn; Conv1D stores [in, out]
            out[f"{o}.self_attn.{name}_proj.weight"] = _lazy(t, f"{h}.attn.c_attn.weight",
                                                             functools.partial(_gpt2_qkv_weight, d=d, j=j))
            out[f"{o}.self_attn.{name}_proj.bias"] = _lazy(t, f"{h}.attn.c_attn.bias",
                                                           functools.partial(_gpt2_qkv_bias, d=d, j=j))
        for src, dst in (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
                         ("mlp.c_proj", "mlp.down_proj")):
            out[f"{o}.{dst}.weight"] = _lazy(t, f"{h}.{src}.weight", torch.t)
            out[f"{o}.{dst}.bias"] = _lazy(t, f"{h}.{src}.bias")
    out["model.norm.weight"], out["model.norm.bias"] = _lazy(t, f"{p}ln_f.weight"), _lazy(t, f"{p}ln_f.bias")
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = _lazy(t, "lm_head.weight")
    return arch, out


def _gpt2_qkv_weight(w: torch.Tensor, d: int, j: int) -> torch.Tensor:
    return w.t()[j * d:(j + 1) * d]


def _gpt2_qkv_bias(b: torch.Tensor, d: int, j: int) -> torch.Tensor:
    return b[j * d:(j + 1) * d]


def convert_opt(cfg: dict, t: ShardReader) -> tuple[NormSwapArch, dict[str, Lazy]]:
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
    out = {"model.embed_tokens.weight": _lazy(t, f"{p}.embed_tokens.weight"),
           # OPTLearnedPositionalEmbedding looks up position + 2 (rows 0, 1 are a fairseq legacy)
           "model.embed_positions.weight": _lazy(t, f"{p}.embed_positions.weight", _drop_two_rows)}
    names = [("self_attn_layer_norm", "input_layernorm"), ("final_layer_norm", "post_attention_layernorm"),
             ("self_attn.q_proj", "self_attn.q_proj"), ("self_attn.k_proj", "self_attn.k_proj"),
             ("self_attn.v_proj", "self_attn.v_proj"), ("self_attn.out_proj", "self_attn.o_proj"),
             ("fc1", "mlp.up_proj"), ("fc2", "mlp.down_proj")]
    for i in range(arch.num_hidden_layers):
        for src, dst in names:
            for leaf in ("weight", "bias"):
                key = f"{p}.layers.{i}.{src}.{leaf}"
                if key in t:
                    out[f"model.layers.{i}.{dst}.{leaf}"] = _lazy(t, key)
    out["model.norm.weight"] = _lazy(t, f"{p}.final_layer_norm.weight")
    out["model.norm.bias"] = _lazy(t, f"{p}.final_layer_norm.bias")
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = _lazy(t, "lm_head.weight")
    return arch, out


def _drop_two_rows(w: torch.Tensor) -> torch.Tensor:
    return w[2:]


def convert_llama(cfg: dict, t: ShardReader) -> tuple[NormSwapArch, dict[str, Lazy]]:
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

    out = {name: _lazy(t, name) for name in tensor_shapes(arch) if name in t}
    return arch, out


CONVERTERS = {"GPT2LMHeadModel": convert_gpt2, "OPTForCausalLM": convert_opt, "LlamaForCausalLM": convert_llama,
              "MistralForCausalLM": convert_llama}


def convert(src, dst, to_rmsnorm: bool = False, dtype: str = "auto") -> NormSwapArch:
    from vllm_normswap.checkpoints.files import load_config, save_checkpoint, save_checkpoint_streaming
    from vllm_normswap.model.config import tensor_shapes

    src, dst = Path(src), Path(dst)
    raw = load_config(src)  # model_type decides who reads it: ours (NormSwapArch) or transformers (AutoConfig)
    t = ShardReader(src)
    if raw.get("model_type") == "normswap":
        arch = NormSwapArch.from_dict(raw)
        lazy = {name: _lazy(t, name) for name in t.keys()}
    else:
        cfg = hf_config(src)
        arch_name = (cfg.get("architectures") or ["?"])[0]
        if arch_name not in CONVERTERS:
            raise ConfigError(f"{src}: architecture {arch_name!r} is not supported; convert handles "
                              f"{', '.join(CONVERTERS)} and NormSwap checkpoints")
        try:
            arch, lazy = CONVERTERS[arch_name](cfg, t)
        except KeyError as err:
            raise ConfigError(f"{src}: checkpoint lacks tensor {err.args[0]!r} that its config implies") from None
    missing = sorted(set(tensor_shapes(arch)) - set(lazy))
    if missing:
        raise ConfigError(f"{src}: checkpoint lacks tensors the mapped config needs: {missing[:5]}")
    lazy = {k: lazy[k] for k in tensor_shapes(arch)}
    if dtype == "auto":
        embed = lazy["model.embed_tokens.weight"]
        out_dtype = t.dtype(embed.args[1]) if isinstance(embed, functools.partial) else embed().dtype
    else:
        out_dtype = getattr(torch, dtype)
    if to_rmsnorm:  # float64 centering over the whole model: in memory
        from vllm_normswap.checkpoints.to_rmsnorm import to_rmsnorm as center

        arch, tensors = center(arch, {k: f() for k, f in lazy.items()})
        save_checkpoint(dst, arch, tensors, dtype=out_dtype)
    else:
        save_checkpoint_streaming(dst, arch, lazy, dtype=out_dtype)
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file() and not shutil.copy(src / f, dst / f) is None]
    if not any(f.startswith("tokenizer") for f in copied):
        print(f"warning: {src} has no tokenizer files; copy them into {dst} before serving it", file=sys.stderr)
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
