"""`normswap plant SRC DST`: a positive control for the A/B. A copy of a checkpoint that computes the same fp32
function, but carries massive FFN post-activation outliers in one layer that int8 weight-only cannot represent.

Construction ("fixed-bias", the same for all four options; N = --channels >= 2, M = --magnitude, a power of two):

1. Pick the N channels of layer L's FFN that contribute least on calibration text (the training split): the
   ones with the smallest Var_t(a_j) * |W_down[:, j]|^2, the mean-square change of the FFN output when channel j's
   activation a_j is replaced by its mean.
2. Make them massive constants, as Sun et al. 2024 ("Massive activations in large language models") find in
   trained LLMs: a few channels with a huge, input-independent activation that act as fixed biases.
   - pointwise FFN (GELU): up_proj row j = 0, its bias = M, so a_j = gelu(M) = M exactly (Phi(M) rounds to 1);
   - gated FFN (SwiGLU): gate and up rows j = 0, gate bias = 32, up bias = M / 32, so a_j = silu(32) * M/32 = M
     exactly (sigmoid(32) rounds to 1 in fp32 and bf16).
   Checked after planting: the reference model's act_out at those channels equals M on every calibration token.
3. Their down_proj columns carry bias terms: column c_0 = (b + m) / M, where b is the original down_proj bias
   and m = sum_j W_down[:, j] E[a_j] the replaced channels' mean contribution; columns c_1..c_{N-1} = v / M;
   the down_proj bias becomes -(N-1) v. v = --shift * (seeded random signs), so M (v / M) = v and (N-1) v are
   exact in bf16 and fp32: the planted terms cancel exactly, with fp32 accumulation, in both precisions.
   The fp32 function changes only by the replaced channels' variance around their mean (step 1) and by the
   bf16 rounding of (b + m) (relative 2^-9): measured, and bounded by TOLERANCE below.
4. Under int8 weight-only with per-output-row scales (AWQ's salient-channel argument, Lin et al. 2024), row r's
   scale is max_k |W_down[r, k]| / 127, set by the row's ordinary weights; the planted entries |v_r| / M are far
   below half a step and round to 0. The int8 model loses b + m + (N-1) v in the residual stream of layer L on
   every token: a regression whose size --shift sets, caused by one linear (layer L's down_proj), exactly where
   act_out has its outliers.

Why not the exact SwiGLU construction (up_proj row j * s, down_proj column j / s, exact in fp32 and bf16)? It
exists only for gated FFNs, and the regression it causes is bounded by the scaled channels' own contribution,
which the model decides; the fixed-bias construction works on every option and its regression is set by --shift.

Tolerance: the planted copy's fp32 logprobs (reference model, held-out text) may differ from the original's by
at most TOLERANCE x the largest per-token |delta logprob| that bf16 rounding alone causes on the same documents
(the reference model in bf16), i.e. the planting is invisible next to the precision every bf16 server has.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_normswap.checkpoints.calibration import calibration_windows, compare, logprobs, reference_model
from vllm_normswap.checkpoints.files import load_arch, load_config, load_tensors
from vllm_normswap.model.checkpoint_format import CheckpointError, int8_layout
from vllm_normswap.model.reference import ReferenceModel
from vllm_normswap.quant.primitives import dequantize, quantize

CONSTRUCTION = "fixed-bias"
GATE_INPUT = 32.0  # gated FFNs: gate pre-activation of the massive channels; silu(32) == 32 in fp32 and bf16
TOLERANCE = 0.25  # max |fp32 delta logprob| <= TOLERANCE x max |bf16-rounding delta logprob| (same documents)
MIN_RATIO = 20.0  # the bar: KL(bf16 || int8) >= 20 x KL(fp32 || bf16) on the planted copy
CALIBRATION_DOCS, EVAL_DOCS, DOC_TOKENS = 16, 16, 128


@dataclass(frozen=True)
class PlantSpec:
    layer: int | None = None  # layer whose FFN gets the massive channels (None: num_hidden_layers // 2)
    magnitude: float = 2.0 ** 14  # M: the massive activation value, a power of two
    channels: int = 2  # N: massive channels (one carries the original bias, N - 1 carry the planted shift v)
    shift: float = 1.0  # |v_r|: what int8 loses per residual feature and planted channel
    seed: int = 0  # signs of v


def _check(spec: PlantSpec, arch, dtype: torch.dtype) -> int:
    """The layer to plant; every bad value named with its fix."""
    layer = arch.num_hidden_layers // 2 if spec.layer is None else spec.layer
    if not 0 <= layer < arch.num_hidden_layers:
        raise CheckpointError(f"--layer {layer}: out of range, the checkpoint has {arch.num_hidden_layers} layers "
                              f"(0..{arch.num_hidden_layers - 1})")
    if not arch.mlp_bias:
        raise CheckpointError("the checkpoint has no FFN biases (mlp_bias: false): the planted massive channels need "
                              "the up/gate-projection bias to hold a constant pre-activation and the down-projection "
                              "bias to cancel their bias terms. Fix: plant a checkpoint with mlp_bias: true (adding "
                              "zero *.mlp.*_proj.bias tensors and mlp_bias: true to config.json keeps the function)")
    if not 2 <= spec.channels <= arch.intermediate_size:
        raise CheckpointError(f"--channels {spec.channels}: need 2..{arch.intermediate_size} (one channel carries "
                              "the original down_proj bias, the others the planted shift)")
    if spec.magnitude < 2 * GATE_INPUT or math.log2(spec.magnitude) % 1:
        raise CheckpointError(f"--magnitude {spec.magnitude:g}: must be a power of two >= {2 * GATE_INPUT:g} (so "
                              "that M (v / M) = v exactly, and gelu(M) = M), e.g. 16384")
    for name, x in (("--shift", spec.shift), ("(channels - 1) x --shift", (spec.channels - 1) * spec.shift),
                    ("--shift / --magnitude", spec.shift / spec.magnitude)):
        if x <= 0 or float(torch.tensor(x).to(dtype)) != x:
            raise CheckpointError(f"{name} = {x:g} is not exactly representable in {dtype}: the planted terms "
                                  "would not cancel; use a power of two, e.g. --shift 1")
    return layer


@torch.no_grad()
def _act_out(model: ReferenceModel, windows: list[list[int]], layer: int) -> torch.Tensor:
    """act_out of ``layer`` on every calibration token: [tokens, intermediate_size], fp32."""
    rows = []
    for ids in windows:
        capture: dict = {}
        model(torch.tensor(ids), capture=capture)
        rows.append(capture[layer]["act_out"].float())
    return torch.cat(rows)


def plant_tensors(arch, tensors: dict[str, torch.Tensor], windows: list[list[int]], spec: PlantSpec
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """The planted tensors (in the checkpoint's dtype) and what was done (layer, channels, ...)."""
    dtype = next(iter(tensors.values())).dtype
    layer = _check(spec, arch, dtype)
    ref = reference_model(arch, tensors)
    act = _act_out(ref, windows, layer)
    p = f"model.layers.{layer}.mlp"
    w_down, b_down = tensors[f"{p}.down_proj.weight"].float(), tensors[f"{p}.down_proj.bias"].float()
    channels = (act.var(0) * w_down.pow(2).sum(0)).argsort()[:spec.channels].tolist()  # least contribution first
    M = spec.magnitude
    signs = torch.randint(0, 2, (arch.hidden_size,), generator=torch.Generator().manual_seed(spec.seed)) * 2 - 1
    v = signs.float() * spec.shift
    carried = b_down + (w_down[:, channels] * act[:, channels].mean(0)).sum(1)  # b + m, rounded below
    out = dict(tensors)

    def put(name: str, t: torch.Tensor) -> None:
        out[name] = t.to(dtype)

    w, b = w_down.clone(), -(spec.channels - 1) * v
    w[:, channels[0]] = carried.to(dtype).float() / M
    for j in channels[1:]:
        w[:, j] = v / M
    put(f"{p}.down_proj.weight", w)
    put(f"{p}.down_proj.bias", b)
    up_bias = M / GATE_INPUT if arch.gated else M
    rows = [("up_proj", up_bias)] + ([("gate_proj", GATE_INPUT)] if arch.gated else [])
    for proj, value in rows:
        w, b = tensors[f"{p}.{proj}.weight"].float().clone(), tensors[f"{p}.{proj}.bias"].float().clone()
        w[channels], b[channels] = 0.0, value
        put(f"{p}.{proj}.weight", w)
        put(f"{p}.{proj}.bias", b)

    # the claims above, checked: the planted terms cancel exactly, and the channels are the constant M
    planted = out[f"{p}.down_proj.weight"].float()[:, channels[1:]] * M
    if not (torch.equal(planted, v[:, None].expand_as(planted))
            and torch.equal(out[f"{p}.down_proj.bias"].float(), -(spec.channels - 1) * v)):
        raise AssertionError("planted down_proj terms do not cancel exactly (a bug: see the module docstring)")
    ref.load_checkpoint_tensors(out)
    got = _act_out(ref, windows[:2], layer)[:, channels]
    if not bool((got == M).all()):
        raise CheckpointError(f"the planted channels' activation is {float(got.min()):g}..{float(got.max()):g}, not "
                              f"the constant {M:g}: this FFN activation ({arch.ffn_act}) does not map a large input "
                              "to itself; the fixed-bias construction does not apply")
    q, scale = quantize(out[f"{p}.down_proj.weight"], "channel")
    kept = dequantize(q, scale, torch.float32)[:, channels[1:]] * M  # what int8 keeps of the planted v
    info = {"layer": layer, "channels": channels, "magnitude": M, "shift": spec.shift, "seed": spec.seed,
            "construction": CONSTRUCTION, "int8_keeps": round(float(kept.abs().max()) / spec.shift, 6),
            "replaced_rms": round(float((act[:, channels].var(0) * w_down[:, channels].pow(2).sum(0)).sum()
                                        .sqrt()), 6)}
    return out, info


# ---- the check: fp32 function kept, int8 regresses (pure-torch reference model, held-out text) ----

def int8_round_trip(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every linear projection through the serving kernel's per-output-row quantize formula and back."""
    out = dict(tensors)
    for name, w in tensors.items():
        if name.endswith("_proj.weight") and w.dim() == 2:
            q, scale = quantize(w, "channel")
            out[name] = dequantize(q, scale, w.dtype)
    return out


def measure(arch, original, planted, docs: list[list[int]]) -> dict:
    def scored(tensors, dtype) -> list[torch.Tensor]:  # every document's logprobs, kept: each set is compared twice
        model = reference_model(arch, tensors, dtype)
        return [logprobs(model, ids) for ids in docs]

    f32 = scored(original, torch.float32)
    f32_planted = scored(planted, torch.float32)
    bf16 = scored(original, torch.bfloat16)
    bf16_planted = scored(planted, torch.bfloat16)
    int8_planted = scored(int8_round_trip(planted), torch.bfloat16)
    # the largest |delta logprob| of an observed token: what a server's prompt logprobs would show
    fp32_delta = compare(f32_planted, f32, docs)["max_abs_logprob_delta"]
    bf16_delta = compare(bf16, f32, docs)["max_abs_logprob_delta"]
    floor, int8 = compare(f32_planted, bf16_planted, docs)["kl"], compare(bf16_planted, int8_planted, docs)["kl"]
    return {"documents": len(docs), "tokens": sum(len(d) - 1 for d in docs),
            "fp32_delta": fp32_delta, "bf16_delta": bf16_delta, "tolerance": TOLERANCE * bf16_delta,
            "within_tolerance": fp32_delta <= TOLERANCE * bf16_delta,
            "kl_floor": floor, "kl_int8": int8, "int8_over_floor": int8 / floor if floor else math.inf}


# ---- the command ----

def plant(src, dst, spec: PlantSpec = PlantSpec(), corpus=None, check: bool = True) -> dict:
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst} already exists; `normswap plant` writes a new directory: pass another DST or "
                              "remove it first")
    config = load_config(src)  # FileNotFoundError naming config.json when SRC is not a checkpoint
    if int8_layout(config):
        raise CheckpointError(f"{src} is an int8 checkpoint; plant into the full-precision checkpoint and quantize "
                              "the planted copy afterwards (`normswap quantize`)")
    arch, tensors = load_arch(src), load_tensors(src)
    _check(spec, arch, next(iter(tensors.values())).dtype)  # bad arguments fail before any text is read
    calibration = calibration_windows(src, corpus, "train", CALIBRATION_DOCS, DOC_TOKENS)
    planted, info = plant_tensors(arch, tensors, calibration, spec)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():  # tokenizer, config and the rest as they are; the weights are rewritten
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, tmp / f.name)
    save_file({k: v.contiguous() for k, v in planted.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    result = {"src": str(src), "dst": str(dst), "option": arch.option, **info}
    (tmp / "plant.json").write_text(json.dumps({**result, "spec": asdict(spec)}, indent=1) + "\n")
    tmp.rename(dst)
    if check:
        heldout = calibration_windows(src, corpus, "heldout", EVAL_DOCS, DOC_TOKENS)
        result.update(measure(arch, tensors, planted, heldout))
    return result


def add_arguments(p) -> None:
    p.add_argument("src", help="full-precision checkpoint directory (e.g. `normswap zoo path ln-gelu`)")
    p.add_argument("dst", help="new directory for the planted copy")
    d = PlantSpec()
    p.add_argument("--layer", type=int, default=None,
                   help="layer to plant (None: the middle one, num_hidden_layers // 2)")
    p.add_argument("--magnitude", type=float, default=d.magnitude, help="the massive activation M (a power of two)")
    p.add_argument("--channels", type=int, default=d.channels, help="massive channels (>= 2)")
    p.add_argument("--shift", type=float, default=d.shift,
                   help="per-feature size of the bias term int8 loses (sets the regression's size)")
    p.add_argument("--seed", type=int, default=d.seed, help="signs of the planted bias term")
    p.add_argument("--corpus", help="calibration (train split) and check (held-out split) text; default: the zoo's")
    p.add_argument("--no-check", action="store_true", help="skip the fp32/bf16/int8 check on held-out text")


def run(args) -> int:
    import sys

    torch.set_num_threads(1)  # a small model's elementwise ops crawl with spinning OpenMP threads on a busy box
    spec = PlantSpec(args.layer, args.magnitude, args.channels, args.shift, args.seed)
    result = plant(args.src, args.dst, spec, args.corpus, check=not args.no_check)
    print(json.dumps(result))
    c = result if "fp32_delta" in result else None
    if c and not c["within_tolerance"]:
        print(f"normswap plant: fp32 delta {c['fp32_delta']:.3g} exceeds the tolerance {c['tolerance']:.3g}; try "
              "another --layer (the planted channels matter less where the residual stream is large)", file=sys.stderr)
        return 1
    if c and c["int8_over_floor"] < MIN_RATIO:
        print(f"normswap plant: int8 KL is only {c['int8_over_floor']:.1f}x the precision floor (< {MIN_RATIO:g}x); "
              "raise --shift", file=sys.stderr)
        return 1
    return 0
