"""Token streams and the fixed batch order shared by every zoo model.

Documents are tokenized and joined with the end-of-text token into one stream; the stream is cut into windows of
``ctx + 1`` tokens (input + shifted target), and a seeded permutation of the windows fixes the data order. Every
option sees exactly the same windows in exactly the same order: the only difference between the four runs is the
architecture.
"""

from __future__ import annotations

import torch

from vllm_normswap.checkpoints.tokenizer import EOS


def encode_stream(tokenizer, docs: list[str], max_tokens: int | None = None, batch_docs: int = 64) -> torch.Tensor:
    """Token ids of ``docs`` joined by EOS (int32), stopping once ``max_tokens`` are collected."""
    eos = tokenizer.token_to_id(EOS)
    out: list[int] = []
    for start in range(0, len(docs), batch_docs):
        for enc in tokenizer.encode_batch(docs[start:start + batch_docs]):
            out.extend(enc.ids)
            out.append(eos)
        if max_tokens is not None and len(out) >= max_tokens:
            return torch.tensor(out[:max_tokens], dtype=torch.int32)
    return torch.tensor(out, dtype=torch.int32)


def shuffled_docs(docs: list[str], seed: int) -> list[str]:
    """Documents in a seeded order, so a token budget smaller than the corpus samples all of it, not its first
    files (the stdlib sorted by name would otherwise be mostly asyncio and collections)."""
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    return [docs[i] for i in order]


def windows(stream: torch.Tensor, ctx: int) -> torch.Tensor:
    """Non-overlapping [N, ctx + 1] windows (the last token of one window is the first of the next)."""
    n = (stream.numel() - 1) // ctx
    if n < 1:
        raise ValueError(f"only {stream.numel()} tokens: not one window of {ctx + 1}; give a larger corpus")
    idx = torch.arange(n)[:, None] * ctx + torch.arange(ctx + 1)[None, :]
    return stream.long()[idx]


def spread_windows(tokenizer, docs: list[str], ctx: int, per_doc: int = 2) -> torch.Tensor:
    """Up to ``per_doc`` windows from the start of EVERY document long enough for one: an evaluation set that
    samples all held-out files, not the first few (one big file would otherwise decide the score)."""
    out = []
    for doc in docs:
        stream = encode_stream(tokenizer, [doc])
        if stream.numel() > ctx:
            out.append(windows(stream, ctx)[:per_doc])
    if not out:
        raise ValueError(f"no held-out document has {ctx + 1} tokens; give a larger corpus")
    return torch.cat(out)


def batch_order(n_windows: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """[steps, batch_size] window indices: seeded permutations, concatenated if the run needs more than one
    pass (epochs)."""
    g = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    perms = [torch.randperm(n_windows, generator=g) for _ in range(-(-need // n_windows))]
    return torch.cat(perms)[:need].view(steps, batch_size)
