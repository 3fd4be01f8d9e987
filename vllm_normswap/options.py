"""The four options of the case study, as (pre-FFN norm, FFN activation) pairs. Validation lives here, once.

Imports nothing but the standard library, so the CLI, the checkpoint tools and the reference can all use it.
"""

from __future__ import annotations

# option id -> (norm_type, ffn_act); see shared case study table.
OPTIONS: dict[str, tuple[str, str]] = {
    "ln-gelu": ("layernorm", "gelu"),  # 4: change nothing (baseline)
    "ln-swiglu": ("layernorm", "swiglu"),  # 1: change the activation only
    "rms-gelu": ("rmsnorm", "gelu"),  # 2: change the norm only
    "rms-swiglu": ("rmsnorm", "swiglu"),  # 3: change both
}
BASELINE = "ln-gelu"

NORM_TYPES = ("layernorm", "rmsnorm")
# gelu = exact erf GELU (the case study's); gelu_tanh = GPT-2's approximation; relu only for converted OPT.
FFN_ACTS = ("gelu", "gelu_tanh", "swiglu", "relu")
# where epsilon goes: the case study writes (sigma + eps); most checkpoints use sqrt(var + eps).
EPS_PLACEMENTS = ("outside_sqrt", "inside_sqrt")
POSITION_TYPES = ("learned", "rope")


class ConfigError(ValueError):
    """A checkpoint or serving config names a value we do not support. The message names field and fix."""


def check_choice(field: str, value, allowed) -> str:
    if value not in allowed:
        raise ConfigError(
            f"config field {field!r} = {value!r} is not supported; allowed values: "
            f"{', '.join(repr(a) for a in allowed)}. Fix config.json (or --hf-overrides) and restart."
        )
    return value


def option_fields(option: str) -> dict[str, str]:
    """Config fields that make an option: ``{"norm_type": ..., "ffn_act": ...}``."""
    check_choice("option", option, tuple(OPTIONS))
    norm_type, ffn_act = OPTIONS[option]
    return {"norm_type": norm_type, "ffn_act": ffn_act}


def option_of(norm_type: str, ffn_act: str) -> str | None:
    """Inverse of :func:`option_fields`; None for combinations outside the four (e.g. converted OPT with relu)."""
    for option, pair in OPTIONS.items():
        if pair == (norm_type, "gelu" if ffn_act == "gelu_tanh" else ffn_act):
            return option
    return None
