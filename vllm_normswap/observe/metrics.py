"""Metric names, types and help texts: the contract with monitoring/ (dashboards, rules) and the README."""

from __future__ import annotations

OUTLIERS = "normswap_activation_outliers"  # counter: exposed as ..._total
ELEMENTS = "normswap_activation_elements"  # counter: exposed as ..._total
ABSMAX = "normswap_activation_absmax"  # gauge, multiprocess mode max
TOKEN_HISTOGRAMS = {"mean": "normswap_token_mean", "std": "normswap_token_std", "absmax": "normswap_token_absmax"}

HELP = {
    OUTLIERS: "Activation elements with |x| > threshold at an FFN site of a decoder layer (tokens the model "
              "computed; sharded sites summed over tensor-parallel ranks).",
    ELEMENTS: "Activation elements observed at an FFN site of a decoder layer (tokens x features).",
    ABSMAX: "Max |x| at an FFN site of a decoder layer over the recent absmax window (absmax_window_s).",
    "normswap_token_mean": "Per-token mean across features at norm_in / norm_out (the case study's mu).",
    "normswap_token_std": "Per-token population standard deviation across features at norm_in / norm_out.",
    "normswap_token_absmax": "Per-token max |x| across features at act_out (the input of the down projection).",
}

LABELS = ("model_name", "layer", "site")

DIR_ENV = "NORMSWAP_METRICS_DIR"  # private multiprocess directory, created by the first process of a run
FILE_ID = "normswap-{pid}"  # our files' id: no underscore, prometheus_client splits file names on "_"
