"""The mean-shift probe curve from the pure-torch reference model, on the documents the servers scored.

A server start costs 35-120 s on a 2-core CPU, so the A/B starts probe servers for one LayerNorm and one RMSNorm
option only and draws the fine curve over c, for every option, from the reference model, which implements the
same formulas independently; the report shows both, so the server points check the curve.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vllm_normswap.registry import DEFAULT_THRESHOLDS

DEFAULT_GRID = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)


@torch.no_grad()
def reference_curve(checkpoint, docs: list[list[int]], grid=DEFAULT_GRID, thresholds=DEFAULT_THRESHOLDS,
                    probe_layers=None) -> list[dict]:
    """Per c: pooled token mean at norm_in / norm_out (mean over tokens and layers, like the server histograms'
    sum/count), act_out outlier rate per threshold, and perplexity."""
    from vllm_normswap.checkpoints.files import load_reference

    model = load_reference(checkpoint)
    base = model.arch
    out = []
    for c in grid:
        model.arch = dataclasses.replace(base, probe_shift=float(c),
                                         probe_layers=tuple(probe_layers) if probe_layers else None)
        mu_in = mu_out = n_tok = nll = n_nll = 0.0
        over = {t: 0.0 for t in thresholds}
        elems = 0.0
        for ids in docs:
            cap: dict = {}
            logits = model.forward(torch.tensor(ids), capture=cap)
            logp = logits.log_softmax(-1)
            nll -= float(logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum())
            n_nll += len(ids) - 1
            for sites in cap.values():
                mu_in += float(sites["norm_in"].mean(-1).sum())
                mu_out += float(sites["norm_out"].mean(-1).sum())
                n_tok += sites["norm_in"].shape[0]
                a = sites["act_out"].abs()
                elems += a.numel()
                for t in thresholds:
                    over[t] += float((a > t).sum())
        out.append({"c": float(c), "mu_norm_in": mu_in / n_tok, "mu_norm_out": mu_out / n_tok,
                    "act_out_rate": {f"{t:g}": over[t] / elems for t in thresholds},
                    "ppl": math.exp(nll / n_nll)})
    model.arch = base
    return out
