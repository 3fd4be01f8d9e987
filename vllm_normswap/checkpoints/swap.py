"""`normswap swap SRC --to OPTION DST`: an initialised checkpoint of another option, made from a trained one, with
the same parameter budget. The two knobs are swapped independently; a swap of both does the norm first.

Norm: LayerNorm -> RMSNorm is exact (``to_rmsnorm``: SliceGPT's re-centring of every residual-stream writer, Ashkboos
et al. 2024), so the fp32 logits do not change. The attention and final norms keep their type (an option names
only the pre-FFN norm; on a centred stream they compute the same either way). A tied LM head is untied, since the
head reads final-norm outputs, which are not zero-sum: that adds vocab x hidden parameters, reported as
``parameters``. ``--keep-tied`` keeps the budget instead: the head then uses the centred rows, which is not exact
(its starting KL is printed) and ``normswap heal`` closes the gap.

FFN: a pointwise FFN of width f, W_d f(W_u h + b_u) + b_d, becomes a gated one of width f' = swiglu_width(f) ~ 2f/3
(three matrices of f' rows hold what two of f rows held). Not exact: a third of the channels go. Per layer, on
calibration tokens of the training split:

1. Keep the f' channels j with the largest Var(a_j) ||W_d[:, j]||^2: the mean-square change of the FFN output when
   channel j's activation a_j = f(z_j) is replaced by its mean, which step 3's bias absorbs (the salience score
   of FLAP, An et al. 2024; ``normswap plant`` ranks channels the same way).
2. Each kept channel j becomes a gated one computing g(s z_j) / s ~ f(z_j): gate row = s W_u[j], gate bias =
   s b_u[j], up row = 0, up bias = 1/s. For SwiGLU g = silu and f = gelu, x sigmoid(1.702 x) is the sigmoid
   approximation of GELU (Hendrycks & Gimpel 2016, sec. 2); s is fitted here per layer, by least squares of
   g(s z)/s against f(z) over the layer's calibration pre-activations, so any (f, g) pair of the registry works.
3. The down projection and its bias are refitted by ridge least squares so that the new FFN reproduces the old
   FFN's output on the calibration tokens: [A', 1] X ~ Y, with A' the new activations and Y the old FFN
   outputs (channel pruning with least-squares reconstruction, He et al. 2017, "Channel Pruning for Accelerating
   Very Deep Neural Networks"). The fit also absorbs part of the dropped channels that the kept ones correlate
   with. On an RMSNorm stream Y is zero-sum per token, and so is the fit's output: the stream stays centred.

The starting KL(source || swapped) on held-out text is measured (mean per token, full vocabulary, fp32 reference
model) and printed; ``normswap heal`` trains the rest back by distillation. The swapped weights are written in
fp32 (bf16 rounding would undo the exact norm swap).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_normswap.checkpoints.calibration import calibration_windows, compare, logprobs, reference_model
from vllm_normswap.checkpoints.files import load_arch, load_config, load_tensors, save_checkpoint
from vllm_normswap.checkpoints.to_rmsnorm import to_rmsnorm
from vllm_normswap.model.checkpoint_format import CheckpointError, int8_layout
from vllm_normswap.model.config import NormSwapArch, parameter_count, swiglu_width
from vllm_normswap.model.reference import function
from vllm_normswap.registry import GATED_ACTS, OPTIONS, ConfigError, check_choice


@dataclass(frozen=True)
class SwapSpec:
    calibration_docs: int = 64  # training-split documents whose tokens calibrate the FFN swap
    eval_docs: int = 32  # held-out documents the starting KL is measured on
    tokens: int = 256  # first tokens of each document (capped at the model's context)
    ridge: float = 1e-3  # down-projection least squares: ridge = this x mean diagonal of A'^T A'
    keep_tied: bool = False  # LayerNorm -> RMSNorm on a tied model: keep the head tied (not exact) instead of untying


# ---- which swaps exist ----------------------------------------------------------------------------------------

def target_arch(arch: NormSwapArch, option: str) -> NormSwapArch:
    """The target's config fields (before any tensor changes): the option's norm_type and FFN activation; a
    source's own pointwise variant (GPT-2's gelu_tanh) is kept when the target keeps a pointwise FFN."""
    check_choice("--to", option, tuple(OPTIONS))
    want = OPTIONS[option]
    if arch.norm_type == "rmsnorm" and want.norm_type == "layernorm":
        raise ConfigError(f"swap RMSNorm -> LayerNorm is not supported (only LayerNorm -> RMSNorm is exact); the "
                          f"source is option {arch.option!r}: swap from a LayerNorm checkpoint, e.g. ln-gelu")
    if arch.gated and want.ffn_act not in GATED_ACTS:
        raise ConfigError(f"swap of a gated FFN ({arch.ffn_act}) to a pointwise one ({want.ffn_act}) is not "
                          "supported; only pointwise (GELU) -> gated (SwiGLU) is: swap from a GELU checkpoint")
    if arch.gated and want.ffn_act != arch.ffn_act:
        raise ConfigError(f"swap between gated FFNs ({arch.ffn_act} -> {want.ffn_act}) is not supported")
    ffn_act = want.ffn_act if want.ffn_act in GATED_ACTS else arch.ffn_act
    width = swiglu_width(arch.intermediate_size) if ffn_act in GATED_ACTS and not arch.gated else \
        arch.intermediate_size
    return arch.replace(norm_type=want.norm_type, ffn_act=ffn_act, intermediate_size=width)


# ---- norm: exact re-centring ----------------------------------------------------------------------------------

def swap_norm(arch: NormSwapArch, tensors: dict, keep_tied: bool) -> tuple[NormSwapArch, dict]:
    """LayerNorm -> RMSNorm for the pre-FFN norm, the other norms keeping their type (see the module docstring)."""
    new_arch, out = to_rmsnorm(arch, tensors)
    new_arch = new_arch.replace(attn_norm_type=arch.attn_norm_type, final_norm_type=arch.final_norm_type)
    if keep_tied and arch.tie_word_embeddings:
        out.pop("lm_head.weight")
        new_arch = new_arch.replace(tie_word_embeddings=True)
    return new_arch, out


# ---- FFN: pointwise -> gated ----------------------------------------------------------------------------------

def fit_scale(f, g, z: torch.Tensor) -> float:
    """s minimising mean (g(s z)/s - f(z))^2 over the pre-activations z: a log-spaced search, then refined."""
    z = z.flatten()
    z = z[torch.randperm(z.numel(), generator=torch.Generator().manual_seed(0))[:200_000]].double()
    target = f(z)

    def err(s: float) -> float:
        return float(((g(s * z) / s - target) ** 2).mean())

    grid = torch.logspace(-2, 4, 121, base=2.0).tolist()  # s in [1/4, 16]
    best = min(grid, key=err)
    for step in (2 ** (1 / 20), 2 ** (1 / 200)):  # two rounds of a finer local search
        best = min((best * step ** k for k in range(-10, 11)), key=err)
    return best


def swap_ffn_layer(p: str, tensors: dict, out: dict, capture: dict, width: int, f, g, ridge: float) -> dict:
    """Write layer ``p``'s gated FFN into ``out`` from its pointwise one in ``tensors`` and the calibration
    ``capture`` (act_in z, act_out a = f(z), ffn_out y); returns what was done."""
    z, a, y = (capture[site].double().reshape(-1, capture[site].shape[-1]) for site in ("act_in", "act_out",
                                                                                           "ffn_out"))
    w_up, w_down = tensors[f"{p}.up_proj.weight"].double(), tensors[f"{p}.down_proj.weight"].double()
    b_up = tensors.get(f"{p}.up_proj.bias")
    b_up = b_up.double() if b_up is not None else torch.zeros(w_up.shape[0], dtype=torch.float64)
    score = a.var(0) * w_down.pow(2).sum(0)
    keep = score.argsort(descending=True)[:width].sort().values
    s = fit_scale(f, g, z[:, keep])
    act = g(s * z[:, keep]) / s  # the new activations: gate g(s z), up 1/s
    design = torch.cat([act, torch.ones(act.shape[0], 1, dtype=act.dtype)], 1)
    gram = design.T @ design
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    x = torch.linalg.solve(gram, design.T @ y)  # [width + 1, d]: down_proj^T, then its bias
    fitted = design @ x
    dtype = tensors[f"{p}.up_proj.weight"].dtype
    out[f"{p}.gate_proj.weight"] = (s * w_up[keep]).to(dtype)
    out[f"{p}.up_proj.weight"] = torch.zeros(width, w_up.shape[1], dtype=dtype)
    out[f"{p}.down_proj.weight"] = x[:-1].T.contiguous().to(dtype)
    if f"{p}.up_proj.bias" in tensors:
        out[f"{p}.gate_proj.bias"] = (s * b_up[keep]).to(dtype)
        out[f"{p}.up_proj.bias"] = torch.full((width,), 1 / s, dtype=dtype)
        out[f"{p}.down_proj.bias"] = x[-1].to(dtype)
    return {"scale": round(s, 4), "kept_score_fraction": round(float(score[keep].sum() / score.sum()), 4),
            "fit_rel_error": round(float((fitted - y).norm() / (y - y.mean(0)).norm()), 4)}


@torch.no_grad()
def _capture(arch: NormSwapArch, tensors: dict, windows: list[list[int]]) -> dict:
    """{layer: {site: tensor [tokens, width]}} over every calibration window (fp32 reference model)."""
    model = reference_model(arch, tensors)
    sites: dict = {}
    for ids in windows:
        capture: dict = {}
        model(torch.tensor(ids), capture=capture)
        for layer, got in capture.items():
            for site, t in got.items():
                sites.setdefault(layer, {}).setdefault(site, []).append(t)
    return {layer: {site: torch.cat(ts) for site, ts in got.items()} for layer, got in sites.items()}


def swap_ffn(arch: NormSwapArch, new_arch: NormSwapArch, tensors: dict, windows: list[list[int]], ridge: float,
             progress: bool = True) -> tuple[dict, list[dict]]:
    """All layers' FFNs swapped; calibration activations from the source (``arch``, ``tensors``)."""
    from tqdm import tqdm

    if not arch.mlp_bias:
        raise CheckpointError("the GELU -> SwiGLU swap writes the up projection as a constant (its bias 1/s): the "
                              "checkpoint has mlp_bias: false. Fix: add zero *.mlp.*_proj.bias tensors and "
                              "mlp_bias: true to config.json (the function stays the same)")
    f, g = function(arch.ffn_act), function(GATED_ACTS[new_arch.ffn_act])
    capture = _capture(arch, tensors, windows)
    out = {k: v for k, v in tensors.items() if ".mlp." not in k}
    layers = []
    for i in tqdm(range(arch.num_hidden_layers), desc="swap FFN", unit="layer", disable=not progress):
        info = swap_ffn_layer(f"model.layers.{i}.mlp", tensors, out, capture[i], new_arch.intermediate_size, f, g,
                              ridge)
        layers.append({"layer": i, **info})
    return out, layers


# ---- the starting distance to the source ----------------------------------------------------------------------

def distance(arch_a, tensors_a, arch_b, tensors_b, windows: list[list[int]]) -> dict:
    """KL(a || b) (mean per token, full vocabulary, nats), both perplexities, and the largest |delta logprob| of
    the observed next tokens, on ``windows`` (fp32 reference models, one window at a time)."""
    a, b = reference_model(arch_a, tensors_a), reference_model(arch_b, tensors_b)
    d = compare((logprobs(a, ids) for ids in windows), (logprobs(b, ids) for ids in windows), windows)
    return {"kl": d["kl"], "src_ppl": round(d["ppl_a"], 3), "dst_ppl": round(d["ppl_b"], 3),
            "max_abs_logprob_delta": d["max_abs_logprob_delta"], "tokens": d["tokens"]}


# ---- the command ----------------------------------------------------------------------------------------------

def swap(src, option: str, dst, spec: SwapSpec = SwapSpec(), corpus=None, progress: bool = True) -> dict:
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst} already exists; `normswap swap` writes a new directory: pass another DST or "
                              "remove it first")
    if int8_layout(load_config(src)):
        raise CheckpointError(f"{src} is an int8 checkpoint; swap the full-precision checkpoint, then quantize")
    arch = load_arch(src)
    tensors = {k: v.float() for k, v in load_tensors(src).items()}
    new_arch = target_arch(arch, option)
    if new_arch == arch:
        raise ConfigError(f"{src} is already option {option!r}: nothing to swap")
    norm_arch, out = arch, tensors
    done: dict = {}
    if new_arch.norm_type != arch.norm_type:
        norm_arch, out = swap_norm(arch, tensors, spec.keep_tied)
        done["norm"] = "exact re-centring (SliceGPT)" + ("; head kept tied (not exact)" if spec.keep_tied
                                                          and arch.tie_word_embeddings else "")
    if new_arch.ffn_act != arch.ffn_act:
        ctx = min(spec.tokens, arch.max_position_embeddings)
        windows = calibration_windows(src, corpus, "train", spec.calibration_docs, ctx)
        final_arch = norm_arch.replace(ffn_act=new_arch.ffn_act, intermediate_size=new_arch.intermediate_size)
        out, done["ffn"] = swap_ffn(norm_arch, final_arch, out, windows, spec.ridge, progress)
        norm_arch = final_arch
    new_arch = norm_arch
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, new_arch, out, dtype=torch.float32)
    for f in src.iterdir():  # tokenizer files as they are; config and weights are written above
        if f.is_file() and (f.name.startswith("tokenizer") or f.name == "special_tokens_map.json"):
            shutil.copy2(f, tmp / f.name)
    ctx = min(spec.tokens, arch.max_position_embeddings)
    heldout = calibration_windows(src, corpus, "heldout", spec.eval_docs, ctx)
    start = distance(arch, tensors, new_arch, out, heldout)
    result = {"src": str(src), "dst": str(dst), "from": arch.option, "to": new_arch.option, "swapped": done,
              "parameters": {"src": parameter_count(arch), "dst": parameter_count(new_arch)},
              "start": start, "spec": asdict(spec)}
    (tmp / "swap.json").write_text(json.dumps(result, indent=1) + "\n")
    tmp.rename(dst)
    return result


def add_arguments(p) -> None:
    d = SwapSpec()
    p.add_argument("src", help="trained checkpoint directory (e.g. `normswap zoo path ln-gelu`)")
    p.add_argument("dst", help="new directory for the swapped checkpoint")
    p.add_argument("--to", dest="option", required=True, choices=list(OPTIONS), help="the option to swap to")
    p.add_argument("--corpus", default=None, help="calibration (train split) and held-out text (None = the zoo's: "
                                                  "this Python's standard library)")
    p.add_argument("--calibration-docs", type=int, default=d.calibration_docs,
                   help="training documents whose first --tokens tokens calibrate the FFN swap")
    p.add_argument("--eval-docs", type=int, default=d.eval_docs,
                   help="held-out documents the starting KL is measured on")
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens per document (capped at the context)")
    p.add_argument("--ridge", type=float, default=d.ridge, help="relative ridge of the down-projection fit")
    p.add_argument("--keep-tied", action="store_true",
                   help="LayerNorm -> RMSNorm of a tied model: keep the LM head tied (same parameter count, not "
                        "exact; heal closes the gap) instead of untying it (exact, + vocab x hidden parameters)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    spec = SwapSpec(args.calibration_docs, args.eval_docs, args.tokens, args.ridge, args.keep_tied)
    print(json.dumps(swap(args.src, args.option, args.dst, spec, args.corpus, not args.no_progress)))
    return 0
