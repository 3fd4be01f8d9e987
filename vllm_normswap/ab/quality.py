"""Quality through the endpoint: perplexity from prompt logprobs, and int8-vs-bf16 divergence with bootstrap CIs.

Requests have the shape lm-evaluation-harness's ``local-completions`` model sends for log-likelihoods
(lm_eval/models/openai_completions.py: token-id prompts, ``echo: true, max_tokens: 1, logprobs: k, temperature: 0,
seed: 1234``; the scored span is ``token_logprobs[ctxlen:-1]``, the last entry being the generated token). As in
lm-eval's ``loglikelihood_rolling``, each document is preceded by the end-of-text token so its first token is
scored too. ``return_tokens_as_token_ids`` (a vLLM extension) keys top-k entries by id, not by decoded text
(byte-level BPE pieces can decode to the same string).

Divergence between two servers (A = reference, e.g. bf16; B = e.g. int8) at each scored position:
- KL(A||B) over the coarse partition {tokens in both top-k lists} + {everything else}: the server caps k at 20, and
  by the data-processing inequality this is a lower bound of the full-vocabulary KL;
- top-1 agreement: the argmax of A's top-k equals B's;
- ΔPPL = PPL(B) - PPL(A).
CIs: paired percentile bootstrap over documents (documents are the independent unit; tokens within a document are
not), token-weighted like the point estimates, all resamples drawn as one index matrix.
The precision floor: the same documents scored by the same weights in fp32 (the pure-torch reference model,
``reference_scores``); KL(fp32 || bf16) is what bf16 rounding alone costs, the yardstick for int8's KL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import requests

from vllm_normswap.ab import auth

SEED = 1234  # lm-eval's default request seed


class NoPromptLogprobs(RuntimeError):
    """The server answered without prompt logprobs: perplexity cannot be computed (never report chance values)."""


@dataclass
class ScoredDoc:
    token_logprobs: list[float]  # log p(x_t | x_<t) for every scored token
    top: list[dict[int, float]]  # top-k {token_id: logprob} at every scored position


def tokenize(url: str, model: str, text: str) -> list[int]:
    r = requests.post(f"{url}/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False},
                      headers=auth.headers(url), timeout=60)
    auth.check(r, url)
    r.raise_for_status()
    return r.json()["tokens"]


def model_info(url: str) -> dict:
    """First served model: {"id", "max_model_len", ...} from /v1/models."""
    r = requests.get(f"{url}/v1/models", headers=auth.headers(url), timeout=30)
    auth.check(r, url)
    r.raise_for_status()
    data = r.json()["data"]
    if not data:
        raise RuntimeError(f"{url}/v1/models lists no model")
    return data[0]


def prepare_documents(url: str, model: str, texts: list[str], window: int, prefix_token_id: int | None) -> list[list[int]]:
    """Token ids of each document, truncated to fit one request (``window`` tokens including the prefix)."""
    docs = []
    for text in texts:
        ids = tokenize(url, model, text)
        ids = ([prefix_token_id] if prefix_token_id is not None else []) + ids
        docs.append(ids[:window])
    return docs


def _token_id(key: str) -> int:
    if not key.startswith("token_id:"):
        raise NoPromptLogprobs(f"top_logprobs key {key!r} is not 'token_id:N'; the server ignored "
                               "return_tokens_as_token_ids (vLLM extension) - use a vLLM OpenAI server")
    return int(key.removeprefix("token_id:"))


def score(url: str, model: str, docs: list[list[int]], top_k: int = 20, batch: int = 8, ctxlen: int = 1,
          order: list[int] | None = None, session: requests.Session | None = None) -> list[ScoredDoc]:
    """Prompt logprobs of ``docs`` (token-id lists), ``batch`` documents per request, in ``order``."""
    s = session or requests.Session()
    order = list(range(len(docs))) if order is None else order
    out: list[ScoredDoc | None] = [None] * len(docs)
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        payload = {"model": model, "prompt": [docs[i] for i in idx], "temperature": 0, "max_tokens": 1,
                   "logprobs": top_k, "seed": SEED, "echo": True, "return_tokens_as_token_ids": True}
        r = s.post(f"{url}/v1/completions", json=payload, headers=auth.headers(url), timeout=600)
        auth.check(r, url)
        if r.status_code != 200:
            raise RuntimeError(f"/v1/completions answered {r.status_code}: {r.text[:500]}")
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        for i, choice in zip(idx, choices):
            lp = choice.get("logprobs") or {}
            tl, top = lp.get("token_logprobs"), lp.get("top_logprobs")
            n = len(docs[i])
            if not tl or not top or len(tl) < n + 1 or any(v is None for v in tl[ctxlen:n]):
                raise NoPromptLogprobs(
                    f"{url} returned no prompt logprobs for a {n}-token echo request (got {0 if not tl else len(tl)}"
                    " entries); perplexity needs echo+logprobs (vLLM: --max-logprobs >= 1)")
            out[i] = ScoredDoc([float(v) for v in tl[ctxlen:n]],
                               [{_token_id(k): float(v) for k, v in t.items()} for t in top[ctxlen:n]])
    return out  # type: ignore[return-value]


# ---- statistics (pure numpy) ----

def position_kl(a: dict[int, float], b: dict[int, float]) -> float:
    """KL(A||B) over {shared top-k tokens} + one tail bucket."""
    shared = a.keys() & b.keys()
    pa = np.array([math.exp(a[t]) for t in shared])
    pb = np.array([math.exp(b[t]) for t in shared])
    ta, tb = max(1.0 - pa.sum(), 0.0), max(1.0 - pb.sum(), 1e-12)
    kl = float(np.sum(pa * (np.log(pa) - np.log(pb))))
    if ta > 1e-12:
        kl += ta * (math.log(ta) - math.log(tb))
    return max(kl, 0.0)


def per_doc_sums(a: list[ScoredDoc], b: list[ScoredDoc] | None = None) -> dict[str, np.ndarray]:
    """Per-document sums: tokens, NLL under A (and B), KL(A||B), top-1 agreements."""
    n = np.array([len(d.token_logprobs) for d in a], dtype=float)
    sums = {"n": n, "nll_a": np.array([-sum(d.token_logprobs) for d in a])}
    if b is not None:
        for da, db in zip(a, b):
            if len(da.token_logprobs) != len(db.token_logprobs):
                raise ValueError("the two runs scored different token counts: not the same documents")
        sums["nll_b"] = np.array([-sum(d.token_logprobs) for d in b])
        sums["kl"] = np.array([sum(position_kl(x, y) for x, y in zip(da.top, db.top)) for da, db in zip(a, b)])
        sums["agree"] = np.array([sum(max(x, key=x.get) == max(y, key=y.get) for x, y in zip(da.top, db.top))
                                  for da, db in zip(a, b)], dtype=float)
    return sums


def _stats(s: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Token-weighted statistics of per-document sums; arrays of shape [..., docs] give results of shape [...]
    (one row per bootstrap resample)."""
    n = s["n"].sum(-1)
    out = {"ppl_a": np.exp(s["nll_a"].sum(-1) / n)}
    if "nll_b" in s:
        out["ppl_b"] = np.exp(s["nll_b"].sum(-1) / n)
        out["delta_ppl"] = out["ppl_b"] - out["ppl_a"]
        out["ppl_ratio"] = out["ppl_b"] / out["ppl_a"]
        out["kl"] = s["kl"].sum(-1) / n
        out["top1_agreement"] = s["agree"].sum(-1) / n
    return out


N_BOOT = 2000  # resamples of the paired bootstrap: percentile CIs at 2.5/97.5 need a few thousand


def summarize(a: list[ScoredDoc], b: list[ScoredDoc] | None = None, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Point estimates with 95% paired-bootstrap CIs over documents: {name: {"value", "lo", "hi"}} + counts.
    Paired: one resample of document indices serves A and B, so their shared per-document difficulty cancels."""
    sums = per_doc_sums(a, b)
    return summarize_sums(sums, n_boot, seed)


def summarize_sums(sums: dict[str, np.ndarray], n_boot: int = N_BOOT, seed: int = 0) -> dict:
    point = {k: float(v) for k, v in _stats(sums).items()}
    k = len(sums["n"])
    idx = np.random.default_rng(seed).integers(0, k, (n_boot, k))  # every resample at once: [n_boot, docs]
    boots = _stats({key: arr[idx] for key, arr in sums.items()})
    result = {name: {"value": v, "lo": float(np.percentile(boots[name], 2.5)),
                     "hi": float(np.percentile(boots[name], 97.5))} for name, v in point.items()}
    result["documents"] = k
    result["tokens"] = int(sums["n"].sum())
    result["resamples"] = n_boot
    return result


def ratio_of_kl(num: dict[str, np.ndarray], den: dict[str, np.ndarray], n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """KL(num) / KL(den) on the same documents, with a paired bootstrap CI: "int8's KL is k x the floor's"."""
    if not np.array_equal(num["n"], den["n"]):
        raise ValueError("the two comparisons scored different documents")
    k = len(num["n"])
    idx = np.random.default_rng(seed).integers(0, k, (n_boot, k))
    ratio = num["kl"][idx].sum(-1) / np.maximum(den["kl"][idx].sum(-1), 1e-300)
    value = float(num["kl"].sum() / max(den["kl"].sum(), 1e-300))
    return {"value": value, "lo": float(np.percentile(ratio, 2.5)), "hi": float(np.percentile(ratio, 97.5))}


def reference_scores(checkpoint, docs: list[list[int]], top_k: int = 20, ctxlen: int = 1) -> list[ScoredDoc]:
    """The documents scored in fp32 by the pure-torch reference model, in the server's format (top-k by id)."""
    import torch

    from vllm_normswap.checkpoints.files import load_reference

    model = load_reference(checkpoint)
    with torch.no_grad():
        # position t predicts ids[t + 1]
        return [scored_doc(model.forward(torch.tensor(ids)).float().log_softmax(-1)[:-1], ids, top_k, ctxlen)
                for ids in docs]


def scored_doc(logp, ids: list[int], top_k: int = 20, ctxlen: int = 1) -> ScoredDoc:
    """One document in the server's format from log-probabilities ``logp`` [len(ids) - 1, vocab] (row t predicts
    ids[t + 1]): the actual tokens' logprobs, and at each position the top-k by id plus the actual token."""
    import torch

    target = torch.tensor(ids[1:])
    token_lp = logp.gather(-1, target[:, None])[:, 0]
    top_v, top_i = logp.topk(top_k, -1)
    tops = []
    for t in range(ctxlen - 1, len(ids) - 1):
        top = dict(zip(top_i[t].tolist(), top_v[t].tolist()))
        top[int(target[t])] = float(token_lp[t])  # the server's top-k also carries the actual token
        tops.append(top)
    return ScoredDoc(token_lp[ctxlen - 1:].tolist(), tops)


def perplexity(docs: list[ScoredDoc]) -> float:
    n = sum(len(d.token_logprobs) for d in docs)
    return math.exp(-sum(sum(d.token_logprobs) for d in docs) / n)
