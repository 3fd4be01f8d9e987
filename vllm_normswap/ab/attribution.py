"""Per-linear int8 attribution: how much of int8's KL each layer's each linear causes, in-process on the A/B's
documents (as the fp32 precision floor is computed).

For every target linear W (qkv, o, gate, up, down of every layer; the LM head when the int8 config has
``lm_head: true`` and the head is untied), the fp32 reference model runs the documents with only W replaced by
its int8 round trip W_hat = q * scale, the serving kernel's formula (quant/primitives.py ``quantize``, the scale
rounded to the checkpoint's bf16 first; the CPU kernel computes sum_k x_k q_nk * scale_n in fp32), and

    KL_W = sum over scored positions of KL(p || p_W),   p = the fp32 reference on the checkpoint's bf16 weights

in nats, full vocabulary, per document (a mean per token = sum / tokens). q/k/v count as one linear because vLLM
serves them as one merged layer (per-row scales make the merge irrelevant to the numbers); gate and up are merged
too but listed apart, as the case study asks. Activations stay fp32: the attribution isolates the weights'
rounding, which is what int8 changes; the served KL(bf16‖int8) also carries the two servers' bf16 activation
rounding. The all-int8 total (every linear the server quantizes) is measured the same way, and also on the
servers' top-k partition (quality.position_kl), to compare like with like against the served KL.

Cost. A linear of layer l changes nothing before it: the residual stream entering layer l (attention linears) or
its FFN (FFN linears) is cached from the baseline pass, and only the rest of the model runs again:
    forward passes = 1 (baseline) + 1 (all-int8) + sum over targets of (layers from the target on) / layers
The KL uses the logit shift dz = (h_W - h) W_head^T against the cached baseline probabilities p:
KL = log E_p[exp(dz - E_p dz)], evaluated as log1p(E_p[expm1(.)]) so that a KL of 1e-7 per token survives fp32.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_normswap.ab.quality import per_doc_sums, scored_doc
from vllm_normswap.checkpoints.files import load_reference
from vllm_normswap.quant.primitives import dequantize, quantize
from vllm_normswap.registry import DEFAULT_THRESHOLDS

ATTENTION = ("qkv_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
LM_HEAD = "lm_head"
TOKENS_PER_CHUNK = 1024  # documents run together up to this many tokens: bounded memory (~35 MB a [tokens, vocab])


@dataclass(frozen=True)
class Int8Settings:
    """What the int8 server quantizes (quant/config.py NormSwapInt8Config's online fields)."""
    granularity: str = "channel"
    group_size: int | None = None
    lm_head: bool = False


def int8_settings(checkpoint, passthrough: list[str] | None = None) -> Int8Settings:
    """The int8 servers' quantization_config: a ``--hf-overrides`` JSON among the server flags (after --), else
    the checkpoint's own normswap_int8 quantization_config, else the online defaults (per channel, no head)."""
    cfg: dict = {}
    path = Path(checkpoint) / "config.json"
    if path.is_file():
        q = json.loads(path.read_text()).get("quantization_config") or {}
        if q.get("quant_method") == "normswap_int8":
            cfg = q
    args = list(passthrough or [])
    for i, a in enumerate(args):
        text = args[i + 1] if a == "--hf-overrides" and i + 1 < len(args) else (
            a.split("=", 1)[1] if a.startswith("--hf-overrides=") else None)
        if text:
            cfg = json.loads(text).get("quantization_config") or cfg
    gran = cfg.get("granularity", "channel")
    return Int8Settings(gran, cfg.get("group_size", 128) if gran == "group" else None, bool(cfg.get("lm_head")))


def int8_weight(w: torch.Tensor, s: Int8Settings) -> torch.Tensor:
    """W_hat in fp32: the serving path's quantize (scale in W's dtype, bf16 for the servers) and q * scale."""
    q, scale = quantize(w.to(torch.bfloat16), s.granularity, s.group_size)
    return dequantize(q, scale, torch.float32)


def targets(arch, s: Int8Settings, layers: list[int] | None = None) -> list[tuple[int, str, list[str]]]:
    """(layer, linear, checkpoint tensor names) for every linear the int8 server quantizes; the LM head has the
    layer index num_hidden_layers (it comes after the last layer)."""
    out = []
    for i in range(arch.num_hidden_layers):
        if layers is not None and i not in layers:
            continue
        p = f"model.layers.{i}"
        out.append((i, "qkv_proj", [f"{p}.self_attn.{x}_proj.weight" for x in "qkv"]))
        out.append((i, "o_proj", [f"{p}.self_attn.o_proj.weight"]))
        out += [(i, n, [f"{p}.mlp.{n}.weight"]) for n in FFN if n != "gate_proj" or arch.gated]
    if s.lm_head and not arch.tie_word_embeddings:  # a tied head stays bf16 on the server (linear_method.py)
        out.append((arch.num_hidden_layers, LM_HEAD, ["lm_head.weight"]))
    return out


class _Stepped:
    """ReferenceModel.forward cut at layer boundaries (the same calls in the same order; the test
    test_stepped_forward_equals_the_reference checks it bit for bit)."""

    def __init__(self, model):
        self.m, self.a = model, model.arch

    def embed(self, ids):
        x = self.m.p("model.embed_tokens.weight")[ids]
        if self.a.position_embedding_type == "learned":
            x = x + self.m.p("model.embed_positions.weight")[torch.arange(ids.shape[1])]
        return x

    def attention_half(self, i, x):
        m, a = self.m, self.a
        x = x + m.attention(i, m.norm(a.attn_norm_type, f"model.layers.{i}.input_layernorm", x),
                            torch.arange(x.shape[1]))
        return x + a.probe_shift if a.probe_applies(i) else x

    def ffn_half(self, i, x, capture=None):
        h = self.m.norm(self.a.norm_type, f"model.layers.{i}.post_attention_layernorm", x)
        return x + self.m.ffn(i, h, capture)

    def final(self, x):
        return self.m.norm(self.a.final_norm_type, "model.norm", x)

    def head(self):
        return self.m.p("model.embed_tokens.weight" if self.a.tie_word_embeddings else "lm_head.weight")

    def baseline(self, ids):
        """The unquantized pass: the residual stream entering every layer's attention and FFN ([layer][0 | 1]),
        the final hidden state, and the observer sites (capture)."""
        x, enter, capture = self.embed(ids), [], {}
        for i in range(self.a.num_hidden_layers):
            mid = self.attention_half(i, x)
            enter.append((x, mid))
            x = self.ffn_half(i, mid, capture)
        return enter, self.final(x), capture

    def run_from(self, layer: int, ffn_only: bool, x):
        for i in range(layer, self.a.num_hidden_layers):
            if not (i == layer and ffn_only):
                x = self.attention_half(i, x)
            x = self.ffn_half(i, x)
        return self.final(x)


def kl_from_shift(p: torch.Tensor, dz: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p ‖ softmax(log p + dz)) per position: log E_p[exp(u)], u = dz - E_p[dz] (E_p[u] = 0, so the sum of
    p * expm1(u) is the second-order remainder, not a difference of two large numbers). ``mean`` = E_p[dz] when
    the caller has it cheaper; dz is overwritten."""
    mean = torch.linalg.vecdot(p, dz) if mean is None else mean
    u = dz.sub_(mean[..., None])
    big = u.amax(-1) > 80.0  # a logit moved by more than e^80 relative to the rest: the exact form, only there
    exact = torch.logsumexp(p[big].log() + u[big], -1) if big.any() else None
    kl = torch.log1p(torch.linalg.vecdot(p, torch.expm1(u.clamp_(max=80.0), out=u)))
    if exact is not None:
        kl[big] = exact
    return kl


@torch.no_grad()
def measure(checkpoint, docs: list[list[int]], settings: Int8Settings, layers: list[int] | None = None,
            thresholds=DEFAULT_THRESHOLDS, top_k: int = 20) -> dict:
    """Per-document KL sums for every target, the all-int8 total (full vocabulary and top-k partition), and the
    baseline's per-layer act_out statistics per document (for the rank correlation's bootstrap)."""
    t0, cpu0 = time.monotonic(), time.process_time()
    model = load_reference(checkpoint)
    step, arch = _Stepped(model), model.arch
    n_layers = arch.num_hidden_layers
    if layers is not None and not all(0 <= i < n_layers for i in layers):
        raise ValueError(f"--attribution-layers {','.join(map(str, layers))}: {checkpoint} has {n_layers} layers "
                         f"(0-{n_layers - 1})")
    chosen = targets(arch, settings, layers)
    every = targets(arch, settings)  # the total: everything the server quantizes
    hats = {name: int8_weight(model.p(name).detach(), settings) for _, _, names in every for name in names}
    kl = {(i, lin): [0.0] * len(docs) for i, lin, _ in chosen}
    total, topk_base, topk_int8 = [0.0] * len(docs), [None] * len(docs), [None] * len(docs)
    act = {"elements": [[0.0] * n_layers for _ in docs], "token_absmax_sum": [[0.0] * n_layers for _ in docs],
           "outliers": {f"{t:g}": [[0.0] * n_layers for _ in docs] for t in thresholds}}
    passes = 0.0

    def swapped(names, fn):
        saved = {n: model.p(n).data for n in names}
        try:
            for n in names:
                model.p(n).data = hats[n]
            return fn()
        finally:
            for n, d in saved.items():
                model.p(n).data = d

    for chunk in _chunks(docs):
        enter, h, capture = step.baseline(torch.tensor([docs[j] for j in chunk]))
        w_head = step.head()
        logp = (h @ w_head.T).float().log_softmax(-1)[:, :-1]  # position t predicts token t + 1
        p = logp.exp()
        _count_act_out(capture, chunk, act, thresholds)
        passes += len(chunk)

        p_head = p @ w_head  # E_p[dz] = (h_q - h) . (p W): the mean logit shift without a pass over the vocabulary

        def shift(h_q, head_names=()):
            """The logit shift dz at the scored positions, and E_p[dz] when it comes cheap."""
            if head_names:
                w_q = hats[head_names[0]]
                return (h_q - h)[:, :-1] @ w_q.T + h[:, :-1] @ (w_q - w_head).T, None
            dh = (h_q - h)[:, :-1]
            return dh @ w_head.T, (dh * p_head).sum(-1)

        for i, lin, names in chosen:
            if lin == LM_HEAD:
                dz, mean = shift(h, names)
            else:
                h_q = swapped(names, lambda: step.run_from(i, lin in FFN, enter[i][lin in FFN]))
                dz, mean = shift(h_q)
                passes += len(chunk) * (n_layers - i - (0.5 if lin in FFN else 0.0)) / n_layers
            for r, v in zip(chunk, kl_from_shift(p, dz, mean).sum(-1).tolist()):
                kl[(i, lin)][r] += v
        names = [n for _, _, ns in every for n in ns]
        h_q = swapped(names, lambda: step.run_from(0, False, enter[0][0]))
        head_names = [n for _, lin, ns in every if lin == LM_HEAD for n in ns]
        dz, mean = shift(h_q, head_names)
        logp_q = logp + dz  # log softmax(log p + dz), normalized below
        kl_tok = kl_from_shift(p, dz, mean)
        logp_q = logp_q.log_softmax(-1)
        passes += len(chunk)
        for r, j in enumerate(chunk):
            total[j] = float(kl_tok[r].sum())
            topk_base[j] = scored_doc(logp[r], docs[j], top_k)
            topk_int8[j] = scored_doc(logp_q[r], docs[j], top_k)
    tokens = [len(d) - 1 for d in docs]
    topk = per_doc_sums(topk_base, topk_int8)["kl"].tolist()
    seconds, cpu = time.monotonic() - t0, time.process_time() - cpu0
    return {"settings": asdict(settings), "layers": n_layers, "tokens": tokens,
            "linears": [{"layer": i, "linear": lin, "kl_docs": kl[(i, lin)]} for i, lin, _ in chosen],
            "total": {"kl_docs": total, "topk_kl_docs": topk, "targets": len(every)},
            "act_out": act,
            "cost": {"forward_passes": round(passes / max(len(docs), 1), 2), "documents": len(docs),
                     "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1)}}


def _count_act_out(capture: dict, chunk: list[int], act: dict, thresholds) -> None:
    """Per document and layer: act_out elements, outliers above each threshold, sum of per-token max |act_out|."""
    for i, sites in capture.items():
        a = sites["act_out"].abs()
        for r, j in enumerate(chunk):
            act["elements"][j][i] = float(a[r].numel())
            act["token_absmax_sum"][j][i] = float(a[r].amax(-1).sum())
            for t in thresholds:
                act["outliers"][f"{t:g}"][j][i] = float((a[r] > t).sum())


def _chunks(docs: list[list[int]]) -> list[list[int]]:
    """Indices of equal-length documents, up to TOKENS_PER_CHUNK tokens per chunk (a batch needs one length)."""
    by_len: dict[int, list[int]] = {}
    for j, d in enumerate(docs):
        by_len.setdefault(len(d), []).append(j)
    out = []
    for n, idx in by_len.items():
        per = max(1, TOKENS_PER_CHUNK // max(n, 1))
        out += [idx[k:k + per] for k in range(0, len(idx), per)]
    return out
