"""`normswap swap` on the zoo's ln-gelu: the LayerNorm -> RMSNorm swap keeps the fp32 logprobs; the GELU -> SwiGLU
swaps print a finite starting KL that is far below a random init's; bad requests fail naming the fix.

The truth is computed here, not by swap.py: the pure-torch reference model in fp32 on held-out documents tokenized
here (other documents than swap.py measures on), KL over the full vocabulary.
"""

import json
import math

import pytest
import torch
from tokenizers import Tokenizer

from vllm_normswap import cli
from vllm_normswap.checkpoints import zoo
from vllm_normswap.checkpoints.corpus import load_corpus
from vllm_normswap.checkpoints.files import load_arch, load_reference
from vllm_normswap.checkpoints.swap import SwapSpec, swap
from vllm_normswap.model.config import swiglu_width
from vllm_normswap.model.reference import ReferenceModel
from vllm_normswap.registry import ConfigError

DOCS, TOKENS = 4, 128
EXACT = 1e-4  # the bar for the norm swap: max |delta logprob| in fp32 (measured ~3e-6)
FAST = ["--calibration-docs", "16", "--eval-docs", "4", "--tokens", "128", "--no-progress"]


@pytest.fixture(scope="module")
def heldout_docs():
    src = zoo.option_dir("ln-gelu")
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    texts = load_corpus().heldout[3::17][:DOCS]  # not the documents swap.py spreads its own measurement over
    return [tok.encode(t).ids[:TOKENS] for t in texts]


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # tiny matmuls: OpenMP threads only spin on the shared box
    threads, _ = torch.get_num_threads(), torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def _logprobs(model, docs):
    return [model(torch.tensor(ids)).float().log_softmax(-1)[:-1] for ids in docs]


def _kl(p, q):
    return float(sum((a.exp() * (a - b)).sum() for a, b in zip(p, q)) / sum(a.shape[0] for a in p))


def _swap(capsys, option, dst, *flags):
    assert cli.main(["swap", str(zoo.option_dir("ln-gelu")), str(dst), "--to", option, *FAST, *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_norm_swap_keeps_logprobs(tmp_path, capsys, heldout_docs):
    out = _swap(capsys, "rms-gelu", tmp_path / "rms")
    arch = load_arch(tmp_path / "rms")
    assert (arch.option, arch.norm_type, arch.attn_norm_type, arch.final_norm_type) == \
        ("rms-gelu", "rmsnorm", "layernorm", "layernorm")  # only the pre-FFN norm is the option's
    src, dst = load_reference(zoo.option_dir("ln-gelu")), load_reference(tmp_path / "rms")
    for a, b, ids in zip(_logprobs(src, heldout_docs), _logprobs(dst, heldout_docs), heldout_docs):
        target = torch.tensor(ids[1:])[:, None]
        delta = (a.gather(-1, target) - b.gather(-1, target)).abs().max()
        assert delta < EXACT, f"the norm swap moved a logprob by {float(delta):.2e}"
    assert out["start"]["max_abs_logprob_delta"] < EXACT


@pytest.mark.parametrize("option", ["ln-swiglu", "rms-swiglu"])
def test_swiglu_swap_starts_close(option, tmp_path, capsys, heldout_docs):
    out = _swap(capsys, option, tmp_path / option)
    assert math.isfinite(out["start"]["kl"]) and out["start"]["kl"] > 0, out["start"]
    arch = load_arch(tmp_path / option)
    assert arch.option == option and arch.intermediate_size == swiglu_width(768)
    src = _logprobs(load_reference(zoo.option_dir("ln-gelu")), heldout_docs)
    swapped = _kl(src, _logprobs(load_reference(tmp_path / option), heldout_docs))
    fresh = ReferenceModel(arch).eval()
    fresh.reset_parameters(seed=0)  # the same option from scratch: what the swap must beat
    random_kl = _kl(src, _logprobs(fresh, heldout_docs))
    print(f"{option}: starting KL {swapped:.4f} (printed {out['start']['kl']:.4f}), random init {random_kl:.2f}")
    assert swapped < 0.01 * random_kl, (swapped, random_kl)


def test_bad_requests_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="RMSNorm -> LayerNorm is not supported"):
        swap(zoo.option_dir("rms-gelu"), "ln-gelu", tmp_path / "x", SwapSpec(), progress=False)
    with pytest.raises(ConfigError, match="already option 'ln-gelu'"):
        swap(zoo.option_dir("ln-gelu"), "ln-gelu", tmp_path / "y", SwapSpec(), progress=False)
    (tmp_path / "taken").mkdir()
    with pytest.raises(Exception, match="already exists"):
        swap(zoo.option_dir("ln-gelu"), "rms-gelu", tmp_path / "taken", SwapSpec(), progress=False)
