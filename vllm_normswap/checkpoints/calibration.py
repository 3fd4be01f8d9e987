"""The text that checkpoint surgery (`normswap plant`, `normswap swap`) calibrates on (the corpus's training split)
and is checked on (its held-out split), and the check: two checkpoints' next-token distributions, from the
pure-torch reference model, compared on the same documents.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer

from vllm_normswap.checkpoints.corpus import load_corpus
from vllm_normswap.checkpoints.files import load_arch
from vllm_normswap.model.checkpoint_format import CheckpointError
from vllm_normswap.model.reference import ReferenceModel


@functools.lru_cache(maxsize=2)
def _corpus(path):
    """The text, read once per process (the stdlib corpus is ~30 MB of files): calibration and check share it."""
    return load_corpus(path)


def calibration_windows(src, corpus, split: str, n_docs: int, tokens: int) -> list[list[int]]:
    """Token ids of ``n_docs`` documents spread evenly over a corpus split ("train" or "heldout"; the zoo corpus
    when ``corpus`` is None), first ``tokens`` tokens each, with the checkpoint's own tokenizer."""
    path = Path(src) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: `normswap plant` and `normswap swap` tokenize calibration and "
                              "held-out text with the checkpoint's tokenizer.json")
    tok = Tokenizer.from_file(str(path))
    c = _corpus(corpus)
    docs = c.train if split == "train" else c.heldout
    picked = [docs[i * len(docs) // n_docs] for i in range(min(n_docs, len(docs)))]
    limit = min(tokens, load_arch(src).max_position_embeddings)
    return [ids[:limit] for ids in (tok.encode(d).ids for d in picked) if len(ids) >= 2]


def reference_model(arch, tensors: dict[str, torch.Tensor], dtype=torch.float32) -> ReferenceModel:
    """The pure-torch reference model with ``tensors`` (in memory, unlike files.load_reference), in eval mode."""
    model = ReferenceModel(arch, dtype=dtype).eval()
    model.load_checkpoint_tensors(tensors)
    return model


@torch.no_grad()
def logprobs(model: ReferenceModel, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab] fp32: row t is log p(. | ids[:t + 1]), the distribution that predicts ids[t + 1]. The
    whole document goes in, as when a server scores a prompt (its prompt_logprobs)."""
    return model(torch.tensor(ids)).float().log_softmax(-1)[:-1]


def compare(a, b, docs: list[list[int]]) -> dict:
    """KL(a || b) (mean per token, full vocabulary, nats), both perplexities of the observed next tokens, and the
    largest |log p_a(x_t | x_<t) - log p_b(x_t | x_<t)| over them. ``a`` and ``b``: each document's ``logprobs``,
    in a list, or in a generator that computes one document at a time (a large vocabulary times many tokens
    does not fit in memory at once)."""
    kl = nll_a = nll_b = delta = 0.0
    n = 0
    for la, lb, ids in zip(a, b, docs):
        target = torch.tensor(ids[1:])[:, None]
        kl += float((la.exp() * (la - lb)).sum())
        ta, tb = la.gather(-1, target), lb.gather(-1, target)
        nll_a, nll_b = nll_a - float(ta.sum()), nll_b - float(tb.sum())
        delta = max(delta, float((ta - tb).abs().max()))
        n += len(ids) - 1
    return {"kl": kl / n, "ppl_a": math.exp(nll_a / n), "ppl_b": math.exp(nll_b / n),
            "max_abs_logprob_delta": delta, "tokens": n}
