"""Held-out quality of a zoo model: perplexity, the unigram baseline on the same tokens, and bits per byte.

The model predicts tokens 1..ctx of each held-out window from the tokens before them (one forward per window,
fp32 reference model). The held-out windows sample every held-out file (``dataset.spread_windows``). The bar
"model perplexity >= 5x lower than unigram" uses a unigram language model fit on the training tokens (add-1/2
smoothing), scored on the same held-out tokens: the standard context-free baseline. The held-out text's OWN token
distribution (fit on the very tokens it is scored on, an oracle) is reported beside it. Bits per byte divide the total negative
log-likelihood (in bits) by the UTF-8 bytes those tokens spell, which makes models with different tokenizers
comparable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 byte length of every vocabulary entry of a byte-level BPE (each vocab character stands for one
    byte; special tokens count as zero bytes)."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    lengths = torch.zeros(tokenizer.get_vocab_size(), dtype=torch.long)
    for piece, idx in tokenizer.get_vocab().items():
        lengths[idx] = len(piece) if all(ch in alphabet for ch in piece) else 0
    return lengths


def unigram_nll(targets: torch.Tensor, vocab_size: int) -> float:
    """Mean negative log-likelihood (nats) of ``targets`` under their own empirical unigram distribution."""
    counts = torch.bincount(targets.flatten(), minlength=vocab_size).double()
    probs = counts / counts.sum()
    return float(-(counts[counts > 0] * probs[counts > 0].log()).sum() / counts.sum())


def unigram_model_nll(train_tokens: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                      alpha: float = 0.5) -> float:
    """Mean negative log-likelihood (nats) of held-out ``targets`` under a unigram LANGUAGE MODEL fit on the
    training tokens (add-alpha smoothing): the standard context-free baseline, trained like the model is."""
    counts = torch.bincount(train_tokens.flatten(), minlength=vocab_size).double() + alpha
    return float(-(counts / counts.sum()).log()[targets.flatten()].mean())


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, byte_lengths: torch.Tensor, train_tokens: torch.Tensor,
             batch_size: int = 8) -> dict:
    """``windows``: [N, ctx + 1] held-out token windows; ``train_tokens``: what the unigram baseline is fit on.
    Returns ppl, the unigram model's ppl and the ratio (the quality bar), the held-out text's own-distribution
    unigram ppl (an oracle no context-free model beats; reported, stricter), bits per byte, counts."""
    model.eval()
    nll_sum, targets = 0.0, windows[:, 1:]
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size]
        logits = model(batch[:, :-1]).float()
        nll_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                         reduction="sum"))
    n_tokens = targets.numel()
    n_bytes = int(byte_lengths[targets].sum())
    nll = nll_sum / n_tokens
    uni = unigram_model_nll(train_tokens, targets, byte_lengths.numel())
    oracle = unigram_nll(targets, byte_lengths.numel())
    return {"heldout_tokens": n_tokens, "heldout_bytes": n_bytes, "ppl": round(math.exp(nll), 3),
            "unigram_ppl": round(math.exp(uni), 3), "ppl_ratio": round(math.exp(uni - nll), 3),
            "oracle_unigram_ppl": round(math.exp(oracle), 3), "oracle_ppl_ratio": round(math.exp(oracle - nll), 3),
            "bits_per_byte": round(nll_sum / math.log(2) / n_bytes, 4),
            "unigram_bits_per_byte": round(uni * n_tokens / math.log(2) / n_bytes, 4)}


@torch.no_grad()
def residual_mean_profile(model, windows: torch.Tensor) -> list[dict]:
    """Per layer, on held-out tokens: the mean over tokens of the feature-mean of the vector entering the pre-FFN
    norm (the case study's mu), its spread (mean per-token std sigma), and the largest |value| after the FFN
    nonlinearity. Reported as they come out of training, so the zoo's README can say whether a mean shift and
    post-activation outliers appeared."""
    capture: dict = {}
    model(windows[:, :-1], capture=capture)
    rows = []
    for layer in sorted(capture):
        sites = capture[layer]
        x = sites["norm_in"].float()
        rows.append({"layer": layer, "norm_in_token_mean_avg": round(float(x.mean(-1).mean()), 4),
                     "norm_in_token_mean_absmax": round(float(x.mean(-1).abs().max()), 4),
                     "norm_in_token_std_avg": round(float(x.std(-1, unbiased=False).mean()), 4),
                     "act_out_absmax": round(float(sites["act_out"].float().abs().max()), 3),
                     "act_out_absmax_over_std": round(float(sites["act_out"].float().abs().max()
                                                            / sites["act_out"].float().std()), 2)})
    return rows
