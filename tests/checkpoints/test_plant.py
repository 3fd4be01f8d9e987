"""`normswap plant` on the four zoo models: the fp32 function is kept, act_out carries the massive channels, int8
weight-only regresses >= 20x the precision floor; bad input fails with a message that names the fix.

The truth is computed here, not by plant.py: the pure-torch reference model (fp32, and in bf16 for the floor),
the serving kernel's quantize formula (quant/primitives.py), on held-out text tokenized here. No server.
"""

import json

import pytest
import torch
from tokenizers import Tokenizer

from vllm_normswap.checkpoints import zoo
from vllm_normswap.checkpoints.corpus import load_corpus
from vllm_normswap.checkpoints.files import load_arch, load_reference, load_tensors
from vllm_normswap.checkpoints.plant import TOLERANCE, PlantSpec, plant
from vllm_normswap.model.checkpoint_format import CheckpointError
from vllm_normswap.model.reference import ReferenceModel
from vllm_normswap.quant.primitives import dequantize, quantize
from vllm_normswap.registry import DEFAULT_THRESHOLDS, OPTIONS
from utils import make_checkpoint

DOCS, TOKENS = 4, 96
RATIO = 20.0  # the positive control's bar: KL(bf16 || int8) >= 20 x KL(fp32 || bf16)


@pytest.fixture(scope="module")
def heldout():
    return load_corpus().heldout[1::20][:DOCS]  # other documents than plant.py checks on (it takes every k-th from 0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: OpenMP threads only spin on the shared box
    yield
    torch.set_num_threads(threads)


def _docs(path, texts):
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    return [[eos] + tok.encode(t).ids[:TOKENS - 1] for t in texts]


@torch.no_grad()
def _logprobs(model, docs):
    return [model(torch.tensor(ids)).float().log_softmax(-1)[:-1] for ids in docs]


def _targets(logprobs, docs):
    return torch.cat([lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])] for lp, ids in zip(logprobs, docs)])


def _kl(p, q):
    return float(sum((a.exp() * (a - b)).sum() for a, b in zip(p, q)) / sum(a.shape[0] for a in p))


def _model(path, dtype, int8=False):
    tensors = load_tensors(path)
    if int8:  # the serving kernel's per-output-row formula on every linear projection
        tensors = {k: dequantize(*quantize(v, "channel"), v.dtype) if k.endswith("_proj.weight") else v
                   for k, v in tensors.items()}
    model = ReferenceModel(load_arch(path), dtype=dtype).eval()
    model.load_checkpoint_tensors(tensors)
    return model


@pytest.mark.parametrize("option", list(OPTIONS))
def test_plant_zoo(option, tmp_path, heldout):
    src, dst = zoo.option_dir(option), tmp_path / "planted"
    info = plant(src, dst, check=False)
    layer, channels, M = info["layer"], info["channels"], info["magnitude"]
    assert layer == load_arch(src).num_hidden_layers // 2 and len(channels) == 2 and M == 2 ** 14
    docs = _docs(dst, heldout)

    # fp32 function kept: per-token |delta logprob| within TOLERANCE x what bf16 rounding alone moves it
    f32, f32_planted = _logprobs(load_reference(src), docs), _logprobs(load_reference(dst), docs)
    delta = float((_targets(f32_planted, docs) - _targets(f32, docs)).abs().max())
    bf16_delta = float((_targets(_logprobs(_model(src, torch.bfloat16), docs), docs) - _targets(f32, docs)).abs().max())
    assert delta <= TOLERANCE * bf16_delta, (delta, bf16_delta)

    # act_out of the planted layer: the channels are the constant M on every token, the others untouched, and an
    # observer's counter at every threshold gains exactly len(channels) per token
    cap, cap_planted = {}, {}
    ids = torch.tensor(docs[0])
    with torch.no_grad():
        load_reference(src)(ids, capture=cap)
        load_reference(dst)(ids, capture=cap_planted)
    a, b = cap[layer]["act_out"], cap_planted[layer]["act_out"]
    assert bool((b[:, channels] == M).all())
    others = [j for j in range(a.shape[-1]) if j not in channels]
    assert torch.equal(a[:, others], b[:, others])
    assert float(a.abs().max()) < M / 100
    for tau in DEFAULT_THRESHOLDS:
        gained = int((b.abs() > tau).sum()) - int((a.abs() > tau).sum())
        assert gained == len(channels) * len(ids) - int((a[:, channels].abs() > tau).sum())

    # int8 weight-only regresses clearly on the planted copy
    bf16 = _logprobs(_model(dst, torch.bfloat16), docs)
    floor, int8 = _kl(f32_planted, bf16), _kl(bf16, _logprobs(_model(dst, torch.bfloat16, int8=True), docs))
    assert int8 >= RATIO * floor, (int8, floor)


def test_bad_input(tmp_path):
    src = zoo.option_dir("ln-gelu")
    with pytest.raises(CheckpointError, match=r"--layer 9: out of range.*4 layers"):
        plant(src, tmp_path / "a", PlantSpec(layer=9), check=False)
    with pytest.raises(FileNotFoundError, match="config.json"):
        plant(tmp_path, tmp_path / "b", check=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        plant(src, tmp_path / "exists", check=False)
    with pytest.raises(CheckpointError, match="power of two"):
        plant(src, tmp_path / "c", PlantSpec(magnitude=1000), check=False)
    no_bias = make_checkpoint(tmp_path / "no-bias", "rms-gelu", mlp_bias=False)
    with pytest.raises(CheckpointError, match="mlp_bias: false.*Fix"):
        plant(no_bias, tmp_path / "d", check=False)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_cli(tmp_path, capsys, monkeypatch):
    """The command: its JSON line (with its own check), and a bad argument as a message with exit status 1."""
    from vllm_normswap import cli
    from vllm_normswap.checkpoints import plant as plant_module

    monkeypatch.setattr(plant_module, "EVAL_DOCS", 4)  # its check on fewer documents: the same code, faster
    rc = cli.main(["plant", str(zoo.option_dir("ln-gelu")), str(tmp_path / "x")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and (tmp_path / "x" / "plant.json").is_file()
    assert out["layer"] == 2 and len(out["channels"]) == 2 and out["magnitude"] == 2 ** 14
    assert out["construction"] == "fixed-bias" and out["int8_keeps"] == 0
    assert out["fp32_delta"] <= out["tolerance"] and out["int8_over_floor"] >= RATIO
    rc = cli.main(["plant", str(zoo.option_dir("ln-gelu")), str(tmp_path / "y"), "--layer", "-1"])
    assert rc == 1 and "out of range" in capsys.readouterr().err
