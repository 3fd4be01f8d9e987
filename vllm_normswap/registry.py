"""The project's facts, each written once: the options, the FFN activations and their gate functions, the
observer's sites, its default thresholds, and the metric names. Everything else imports them; files that cannot
import (YAML, JSON, k8s) are checked against this module by tests/test_registry_files.py.

Imports nothing but the standard library, so the CLI, the checkpoint tools, the reference and the tests can all
use it. To add an option, add one ``Option`` to ``OPTIONS``, then run scripts/gen_deploy.py
(docs/adding-an-option.md).
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- options --------------------------------------------------------------------------------------------------

# The role of an option in the decision: which of the case study's two knobs it turns, relative to the baseline.
BASELINE_ROLE, ACTIVATION_ROLE, NORM_ROLE, BOTH_ROLE = "baseline", "activation", "norm", "both"
ROLES = (BASELINE_ROLE, ACTIVATION_ROLE, NORM_ROLE, BOTH_ROLE)


@dataclass(frozen=True)
class Option:
    id: str  # the name users type, serving configs and served model names use
    case_study: int  # the option's number in the case study's table
    norm_type: str  # pre-FFN norm: one of NORM_TYPES
    ffn_act: str  # FFN activation: one of ffn_acts()
    role: str  # which knob it turns relative to the baseline: one of ROLES
    change: str  # the change in words, as the decision states it
    color: str  # its colour in every plot (matplotlib name)

    @property
    def fields(self) -> dict[str, str]:
        """The config fields that make this option."""
        return {"norm_type": self.norm_type, "ffn_act": self.ffn_act}


OPTIONS: dict[str, Option] = {o.id: o for o in (
    Option("ln-swiglu", 1, "layernorm", "swiglu", ACTIVATION_ROLE, "change the activation to SwiGLU", "tab:orange"),
    Option("rms-gelu", 2, "rmsnorm", "gelu", NORM_ROLE, "change the norm to RMSNorm", "tab:green"),
    Option("rms-swiglu", 3, "rmsnorm", "swiglu", BOTH_ROLE, "change both (RMSNorm and SwiGLU)", "tab:red"),
    Option("ln-gelu", 4, "layernorm", "gelu", BASELINE_ROLE, "change nothing", "tab:blue"),
)}
BASELINE = next(o.id for o in OPTIONS.values() if o.role == BASELINE_ROLE)

NORM_TYPES = ("layernorm", "rmsnorm")
# how people write each norm and FFN activation (line 1 of a generated serving config, scripts/gen_deploy.py); a
# name missing here is written as its id
NORM_NAMES = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm (with beta)"}
ACT_NAMES = {"gelu": "GELU", "gelu_tanh": "GELU (tanh approximation)", "swiglu": "SwiGLU", "relu": "ReLU"}
# The FFN activations. A pointwise FFN computes down(f(h W_up + b_up)), f named by the activation itself: gelu =
# exact erf GELU (the case study's), gelu_tanh = GPT-2's approximation, relu only for converted OPT. A gated FFN
# computes down(g(h W_gate + b_gate) * (h W_up + b_up)); GATED_ACTS maps it to its gate function g (SwiGLU: swish
# = silu; a GeGLU would map to "gelu"). Its third matrix shrinks the width by 2/3 to keep the parameter count
# (model/config.py, swiglu_width). The functions are named here, not written: model/activations.py (for the vLLM
# and transformers models) and model/reference.py (the tests' independent truth) each write every name of
# POINTWISE_FNS on their own, and each raises on a name it does not know.
POINTWISE_ACTS = ("gelu", "gelu_tanh", "relu")
GATED_ACTS: dict[str, str] = {"swiglu": "silu"}
POINTWISE_FNS = (*POINTWISE_ACTS, "silu")
# where epsilon goes: the case study writes (sigma + eps); most checkpoints use sqrt(var + eps).
EPS_PLACEMENTS = ("outside_sqrt", "inside_sqrt")
POSITION_TYPES = ("learned", "rope")
PRECISIONS = ("bf16", "int8")  # what `normswap ab` serves each option in

# ---- observer sites and thresholds ---------------------------------------------------------------------------

# The five FFN sites of a decoder layer, in forward order: norm input/output, activation input/output, FFN output.
SITES = ("norm_in", "norm_out", "act_in", "act_out", "ffn_out")
SHARDED_SITES = ("act_in", "act_out")  # split over tensor-parallel ranks; the other sites are replicated
# per-token statistics kept as histograms, by site
TOKEN_HIST_SITES = {"norm_in": ("mean", "std"), "norm_out": ("mean", "std"), "act_out": ("absmax",)}
DEFAULT_THRESHOLDS = (3.0, 6.0, 20.0)  # |x| > tau is counted; 6.0 is LLM.int8()'s outlier threshold
DECISION_THRESHOLD = 6.0  # the threshold the decision reads act_out outlier rates at
DECISION_SITE = "act_out"  # the case study's worst outliers appear after the nonlinearity

# ---- metric names (the contract with monitoring/ and README) ------------------------------------------------

OUTLIERS = "normswap_activation_outliers"  # counter: exposed as ..._total
ELEMENTS = "normswap_activation_elements"  # counter: exposed as ..._total
ABSMAX = "normswap_activation_absmax"  # gauge, multiprocess mode max
TOKEN_HISTOGRAMS = {"mean": "normswap_token_mean", "std": "normswap_token_std", "absmax": "normswap_token_absmax"}
LABELS = ("model_name", "layer", "site")  # outliers add "threshold"

HELP = {
    OUTLIERS: "Activation elements with |x| > threshold at an FFN site of a decoder layer (tokens the model "
              "computed; sharded sites summed over tensor-parallel ranks).",
    ELEMENTS: "Activation elements observed at an FFN site of a decoder layer (tokens x features).",
    ABSMAX: "Max |x| at an FFN site of a decoder layer over the recent absmax window (absmax_window_s).",
    TOKEN_HISTOGRAMS["mean"]: "Per-token mean across features at norm_in / norm_out (the case study's mu).",
    TOKEN_HISTOGRAMS["std"]: "Per-token population standard deviation across features at norm_in / norm_out.",
    TOKEN_HISTOGRAMS["absmax"]: "Per-token max |x| across features at act_out (the input of the down projection).",
}


# ---- validation, once ----------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """A checkpoint or serving config names a value we do not support. The message names field and fix."""


def check_choice(field: str, value, allowed) -> str:
    if value not in allowed:
        raise ConfigError(
            f"config field {field!r} = {value!r} is not supported; allowed values: "
            f"{', '.join(repr(a) for a in allowed)}. Fix config.json (or --hf-overrides) and restart."
        )
    return value


def ffn_acts() -> tuple[str, ...]:
    """Every FFN activation a config may name: the pointwise ones, then the gated ones (read at call time, so an
    activation added to GATED_ACTS counts at once)."""
    return (*POINTWISE_ACTS, *GATED_ACTS)


def option_fields(option: str) -> dict[str, str]:
    """Config fields that make an option: ``{"norm_type": ..., "ffn_act": ...}``."""
    check_choice("option", option, tuple(OPTIONS))
    return OPTIONS[option].fields


def option_of(norm_type: str, ffn_act: str) -> str | None:
    """Inverse of :func:`option_fields`; None for combinations outside the options (e.g. converted OPT with relu)."""
    exact = next((o.id for o in OPTIONS.values() if (o.norm_type, o.ffn_act) == (norm_type, ffn_act)), None)
    if exact or ffn_act != "gelu_tanh":
        return exact
    # GPT-2's tanh GELU serves as the GELU option unless an option of its own is registered
    return next((o.id for o in OPTIONS.values() if (o.norm_type, o.ffn_act) == (norm_type, "gelu")), None)


def parse_list(flag: str, text: str, allowed) -> list[str]:
    """A comma list from the command line, every item checked against ``allowed`` (argparse raises exit 2)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise ValueError(f"{flag} {text!r}: unknown value(s) {', '.join(map(repr, bad)) or '(empty list)'}; "
                         f"choose from {', '.join(allowed)}")
    return items
