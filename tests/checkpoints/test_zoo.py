"""`normswap zoo build --quick` end to end, and the committed zoo: loads in vLLM and meets the perplexity bar.

The bar is recomputed here, independently of the zoo.json the builder wrote: the held-out documents of the
running interpreter's stdlib (hash split by file name, so the same files as at build time), encoded with the
committed tokenizer, scored by the pure-torch reference model; unigram = the held-out tokens' own distribution.
"""

from __future__ import annotations

import json

import pytest
import torch

from vllm_normswap.registry import OPTIONS


def test_quick_build(tmp_path, monkeypatch):
    from vllm_normswap.checkpoints.files import load_arch
    from vllm_normswap.checkpoints.zoo import build

    monkeypatch.setenv("VLLM_NORMSWAP_CACHE", str(tmp_path / "cache"))
    summary = build(tmp_path / "zoo", quick=True, progress=False)
    params = {o: summary["options"][o]["parameters"] for o in OPTIONS}
    base = params["ln-gelu"]
    for option in OPTIONS:
        d = tmp_path / "zoo" / option
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in d.iterdir()}
        assert load_arch(d).option == option
        assert abs(params[option] - base) / base < 0.02, params
        curve = json.loads((d / "zoo.json").read_text())["loss_curve_every_10"]
        assert curve[-1] < curve[0] - 0.5, f"{option}: training did not reduce the loss: {curve}"
    # resumable cache: a second build retrains nothing and writes the same weights
    again = build(tmp_path / "zoo2", quick=True, progress=False)
    assert again["options"]["ln-gelu"]["ppl"] == summary["options"]["ln-gelu"]["ppl"]


def _committed(option):
    from vllm_normswap.checkpoints.zoo import option_dir

    d = option_dir(option)
    if not (d / "config.json").is_file():
        pytest.skip(f"committed zoo checkpoint {d} not built yet (run `normswap zoo build`)")
    return d


def _bar_data(tokenizer, ctx):
    """Held-out windows from every held-out file, and the training tokens the unigram baseline is fit on."""
    from vllm_normswap.checkpoints.corpus import stdlib_corpus
    from vllm_normswap.checkpoints.dataset import encode_stream, shuffled_docs, spread_windows
    from vllm_normswap.checkpoints.zoo import DATA_SEED, EVAL_WINDOWS_PER_DOC, FULL

    corpus = stdlib_corpus()
    win = spread_windows(tokenizer, shuffled_docs(corpus.heldout, DATA_SEED), ctx, EVAL_WINDOWS_PER_DOC)
    spec = FULL["spec"]
    train = encode_stream(tokenizer, shuffled_docs(corpus.train, DATA_SEED),
                          spec["steps"] * spec["batch_size"] * spec["ctx"] + 1)
    return win, train.long()


@pytest.fixture(scope="module")
def bar_data():
    from tokenizers import Tokenizer

    d = _committed("ln-gelu")
    from vllm_normswap.checkpoints.zoo import FULL

    return _bar_data(Tokenizer.from_file(str(d / "tokenizer.json")), FULL["spec"]["ctx"])


@pytest.mark.parametrize("option", list(OPTIONS))
def test_committed_zoo_perplexity_bar(option, bar_data):
    """Held-out perplexity at least 5x below a unigram language model of the same tokenizer fit on the training
    tokens (add-1/2 smoothing) and scored on the same held-out tokens."""
    from vllm_normswap.checkpoints.files import load_reference

    model = load_reference(_committed(option))
    win, train = bar_data
    with torch.no_grad():
        logits = torch.cat([model(win[i:i + 8, :-1]) for i in range(0, len(win), 8)])
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1))
    counts = torch.bincount(train, minlength=model.arch.vocab_size).double() + 0.5
    unigram_nll = -(counts / counts.sum()).log()[win[:, 1:].flatten()].mean()
    ratio = float((unigram_nll - nll).exp())
    print(f"{option}: ppl {nll.exp():.2f}, unigram ppl {unigram_nll.exp():.2f}, ratio {ratio:.2f} "
          f"({win.shape[0]} windows)")
    assert ratio >= 5.0


def _heldout_ids(d) -> list[list[int]]:
    from tokenizers import Tokenizer

    from vllm_normswap.checkpoints.corpus import stdlib_corpus
    from vllm_normswap.checkpoints.dataset import shuffled_docs, spread_windows
    from vllm_normswap.checkpoints.zoo import DATA_SEED

    docs = shuffled_docs(stdlib_corpus().heldout, DATA_SEED)[:4]
    win = spread_windows(Tokenizer.from_file(str(d / "tokenizer.json")), docs, 128, per_doc=1)[:2]
    return [w.tolist() for w in win]


@pytest.fixture(scope="module")
def zoo_in_vllm():
    """option -> (checkpoint dir, prompts, vLLM result) for every committed zoo checkpoint, all engines in one
    offline-runner process."""
    from utils import run_vllm_offline
    from vllm_normswap.checkpoints.zoo import option_dir

    dirs = {o: option_dir(o) for o in OPTIONS if (option_dir(o) / "config.json").is_file()}
    ids = {o: _heldout_ids(d) for o, d in dirs.items()}
    results = run_vllm_offline([{"model": str(d), "prompts": ids[o], "max_tokens": 1, "max_model_len": 256}
                                for o, d in dirs.items()]) if dirs else []
    return {o: (dirs[o], ids[o], r) for o, r in zip(dirs, results)}


@pytest.mark.server
@pytest.mark.parametrize("option", list(OPTIONS))
def test_committed_zoo_serves_in_vllm(option, zoo_in_vllm):
    """vLLM bf16 prompt logprobs on held-out text agree with the reference (mean NLL within 0.05 nats)."""
    from vllm_normswap.checkpoints.files import load_reference

    _committed(option)
    d, ids, got = zoo_in_vllm[option]
    ref = load_reference(d)
    vllm_nll = -torch.tensor(got["prompt_logprobs"]).mean()
    ref_nll = -torch.tensor([ref.prompt_logprobs(x) for x in ids]).mean()
    print(f"{option}: vLLM NLL {vllm_nll:.4f}, reference {ref_nll:.4f}")
    assert abs(vllm_nll - ref_nll) < 0.05
