"""The seeded workload every option gets: held-out documents for the quality eval, prompts for the load test.

Built from the zoo corpus's held-out split (never trained on), so all options see identical text. Saved as
JSONL so locust workers (possibly on other machines) read exactly the same prompts.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Workload:
    documents: list[str]  # quality eval: whole held-out documents (truncated to the model window per tokenizer)
    prompts: list[str]  # load test: fixed-length text prompts
    max_tokens: int  # load test: output length (with ignore_eos, every request generates exactly this many)
    seed: int
    source: str
    meta: dict = field(default_factory=dict)

    def save_prompts(self, path) -> Path:
        """JSONL that load_tests/locustfile.py reads (NORMSWAP_WORKLOAD=path)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for p in self.prompts:
                f.write(json.dumps({"prompt": p, "max_tokens": self.max_tokens}) + "\n")
        return path

    def describe(self) -> dict:
        d = asdict(self)
        d["documents"] = len(self.documents)
        d["prompts"] = len(self.prompts)
        return d


def heldout_texts(corpus: str | None = None) -> tuple[list[str], str]:
    from vllm_normswap.checkpoints.corpus import load_corpus

    c = load_corpus(corpus)
    return c.heldout, c.source


def build_workload(n_docs: int = 16, doc_chars: int = 1500, n_prompts: int = 64, prompt_chars: int = 200,
                   max_tokens: int = 16, seed: int = 0, corpus: str | None = None,
                   texts: list[str] | None = None) -> Workload:
    """Documents: the first ``doc_chars`` characters of ``n_docs`` held-out files drawn with ``seed``.
    Prompts: ``n_prompts`` windows of ``prompt_chars`` characters at seeded offsets."""
    if texts is None:
        texts, source = heldout_texts(corpus)
    else:
        source = "given texts"
    texts = [t for t in texts if len(t.strip()) >= 64]
    if not texts:
        raise ValueError("the held-out split has no document of 64+ characters; give a larger --corpus")
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    docs = [texts[i][:doc_chars] for i in order[:n_docs]]
    prompts = []
    for _ in range(n_prompts):
        t = texts[rng.randrange(len(texts))]
        start = rng.randrange(max(1, len(t) - prompt_chars))
        prompts.append(t[start:start + prompt_chars])
    return Workload(docs, prompts, max_tokens, seed, source,
                    {"doc_chars": doc_chars, "prompt_chars": prompt_chars, "heldout_docs": len(texts)})
