"""The quality statistics against direct computations on full distributions (no server)."""

import math

import numpy as np
import pytest

from vllm_normswap.ab import quality


def _doc(rng, vocab, positions, k, temp=1.0, perturb=None):
    logits = rng.normal(size=(positions, vocab)) * 3
    if perturb is not None:
        logits = logits + perturb
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = rng.integers(0, vocab, positions)
    tops = []
    for t in range(positions):
        idx = np.argsort(-logp[t])[:k]
        top = {int(i): float(logp[t, i]) for i in idx}
        top[int(targets[t])] = float(logp[t, targets[t]])  # the server adds the actual token
        tops.append(top)
    return logp, targets, quality.ScoredDoc([float(logp[t, targets[t]]) for t in range(positions)], tops)


def test_coarse_kl_is_a_tight_lower_bound_of_the_full_kl():
    rng = np.random.default_rng(0)
    for _ in range(20):
        base = rng.normal(size=(1, 64)) * 3
        p = np.exp(base) / np.exp(base).sum()
        q_logits = base + rng.normal(size=(1, 64)) * 0.3
        q = np.exp(q_logits) / np.exp(q_logits).sum()
        full = float(np.sum(p * np.log(p / q)))
        k = 20
        a = {int(i): math.log(p[0, i]) for i in np.argsort(-p[0])[:k]}
        b = {int(i): math.log(q[0, i]) for i in np.argsort(-q[0])[:k]}
        coarse = quality.position_kl(a, b)
        assert coarse <= full + 1e-9  # data-processing inequality
        assert coarse >= 0.5 * full - 1e-4  # and most of it with k = 20 of 64 on peaked distributions


def test_summary_matches_direct_token_weighted_numbers_and_cis_cover_them():
    rng = np.random.default_rng(1)
    a_docs, b_docs, nll_a, nll_b, n, agree = [], [], 0.0, 0.0, 0, 0
    for d in range(12):
        positions = int(rng.integers(5, 40))
        state = rng.bit_generator.state
        la, targets, da = _doc(rng, 50, positions, 20)
        rng.bit_generator.state = state  # same logits and targets, B perturbed
        lb, _, db = _doc(rng, 50, positions, 20, perturb=np.random.default_rng(d).normal(size=(positions, 50)) * .2)
        a_docs.append(da)
        b_docs.append(db)
        nll_a -= la[np.arange(positions), targets].sum()
        nll_b -= lb[np.arange(positions), targets].sum()
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
        n += positions
    s = quality.summarize(a_docs, b_docs, n_boot=300)
    assert s["ppl_a"]["value"] == pytest.approx(math.exp(nll_a / n), rel=1e-9)
    assert s["delta_ppl"]["value"] == pytest.approx(math.exp(nll_b / n) - math.exp(nll_a / n), rel=1e-9)
    assert s["top1_agreement"]["value"] == pytest.approx(agree / n)
    for key in ("ppl_a", "delta_ppl", "kl", "top1_agreement"):
        assert s[key]["lo"] <= s[key]["value"] <= s[key]["hi"]
    assert s["kl"]["lo"] > 0  # a real perturbation is distinguishable from zero
    same = quality.summarize(a_docs, a_docs, n_boot=50)
    assert same["kl"]["value"] == 0 and same["delta_ppl"]["hi"] == 0 and same["top1_agreement"]["value"] == 1


def test_mismatched_documents_are_refused():
    rng = np.random.default_rng(2)
    a = [_doc(rng, 30, 10, 5)[2]]
    b = [_doc(rng, 30, 11, 5)[2]]
    with pytest.raises(ValueError, match="different token counts"):
        quality.summarize(a, b)
