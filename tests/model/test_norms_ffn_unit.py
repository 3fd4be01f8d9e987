"""Fast unit tests, no vLLM engine: the reference's norms and FFN formulas against independent computations, the
model's own norms (model/norms.py) and FFNs (model/ffn.py) against the reference, the SwiGLU width rule and the
parameter counts, and the CLI's --help. Seconds on a CPU.

model/ffn.py builds its FFNs from vLLM's tensor-parallel linear layers, which need vLLM's parallel state; here
they are replaced by plain ``nn.Linear`` stand-ins with the same call convention (``out, bias = layer(x)``,
gate|up merged into one output), so the test checks ffn.py's own arithmetic: activation, gating and the order
of the gate and up halves.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vllm_normswap.model import reference
from vllm_normswap.model.config import parameter_report, swiglu_width
from vllm_normswap.model.norms import Norm
from vllm_normswap.registry import GATED_ACTS, OPTIONS

D, EPS = 64, 1e-5


def _inputs(seed: int = 0, shift: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    # a large per-token mean (the case study's residual stream) and an outlier feature
    h = torch.randn(5, D, generator=g, dtype=torch.float64) * 1.7 + shift
    h[:, 3] += 20.0
    alpha = torch.randn(D, generator=g, dtype=torch.float64) * 0.3 + 1.0
    beta = torch.randn(D, generator=g, dtype=torch.float64) * 0.1
    return h, alpha, beta


# ---- norms ------------------------------------------------------------------------------------------------------

def test_layer_norm_inside_sqrt_is_torch_layer_norm():
    h, alpha, beta = _inputs()
    want = F.layer_norm(h, (D,), alpha, beta, EPS)
    got = reference.layer_norm(h, alpha, beta, EPS, inside=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_layer_norm_outside_sqrt_hand_formula():
    """The case study's form: alpha (h - mu) / (sigma + eps) + beta, sigma the population std; element by
    element in float64."""
    h, alpha, beta = _inputs(1)
    eps = 0.1  # large: inside and outside placements clearly differ
    got = reference.layer_norm(h, alpha, beta, eps, inside=False)
    for t in range(h.shape[0]):
        row = h[t].tolist()
        mu = sum(row) / D
        sigma = math.sqrt(sum((x - mu) ** 2 for x in row) / D)
        want = [a * (x - mu) / (sigma + eps) + b for x, a, b in zip(row, alpha.tolist(), beta.tolist())]
        torch.testing.assert_close(got[t], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, reference.layer_norm(h, alpha, beta, eps, inside=True))


@pytest.mark.parametrize("inside", [False, True])
def test_rms_norm_hand_formula_keeps_beta_no_mean_subtraction(inside):
    h, alpha, beta = _inputs(2)
    eps = 0.1
    got = reference.rms_norm(h, alpha, beta, eps, inside=inside)
    for t in range(h.shape[0]):
        row = h[t].tolist()
        ms = sum(x * x for x in row) / D
        denom = math.sqrt(ms + eps) if inside else math.sqrt(ms) + eps
        want = [a * x / denom + b for x, a, b in zip(row, alpha.tolist(), beta.tolist())]
        torch.testing.assert_close(got[t], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # beta is kept: RMSNorm without beta differs by exactly beta
    torch.testing.assert_close(got - reference.rms_norm(h, alpha, None, eps, inside=inside), beta.expand_as(got))
    # no mean subtraction: shifting every feature by c moves the output (LayerNorm's would not move)
    c = 4.0
    assert (reference.rms_norm(h + c, alpha, beta, eps, inside) - got).abs().max() > 0.1
    torch.testing.assert_close(reference.layer_norm(h + c, alpha, beta, eps, inside),
                               reference.layer_norm(h, alpha, beta, eps, inside), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("placement", ["outside_sqrt", "inside_sqrt"])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("bias", [True, False])
def test_model_norm_matches_reference(kind, placement, bias):
    """model/norms.py (what vLLM runs) against the reference, in float32 and bf16 (computed in fp32, cast)."""
    h, alpha, beta = _inputs(3)
    eps = 1e-2
    norm = Norm(kind, D, eps, placement, bias=bias)
    with torch.no_grad():
        norm.weight.copy_(alpha)
        if bias:
            norm.bias.copy_(beta)
    f = reference.layer_norm if kind == "layernorm" else reference.rms_norm
    want = f(h, alpha, beta if bias else None, eps, placement == "inside_sqrt")
    with torch.no_grad():
        got32 = norm(h.float())
        got16 = norm(h.bfloat16())
    assert got32.dtype == torch.float32 and got16.dtype == torch.bfloat16
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got16.double(), want, rtol=2e-2, atol=2e-2)


# ---- FFN formulas ---------------------------------------------------------------------------------------------

def _ffn_reference(ffn_act: str, f: int = 96, seed: int = 4):
    """A one-layer reference model (weights random) and its FFN input."""
    from vllm_normswap.checkpoints.random_init import make_arch

    arch = make_arch(OPTIONS["ln-gelu"].id, hidden_size=D, layers=1, heads=1, vocab_size=32, gelu_width=f)
    arch = arch.replace(ffn_act=ffn_act, intermediate_size=f)
    model = reference.ReferenceModel(arch, dtype=torch.float64)
    model.reset_parameters(seed)
    with torch.no_grad():  # non-zero biases, so that every term matters
        for name, p in model.params.items():
            if name.endswith("bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    h = torch.randn(7, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return model, h


def _w(model, name):
    return model.p(f"model.layers.0.mlp.{name}").detach()


@pytest.mark.parametrize("ffn_act", ["gelu", "gelu_tanh", "relu"])
def test_pointwise_ffn_formula(ffn_act):
    """W2 act(W1 h + b1) + b2, act from torch's own implementations."""
    model, h = _ffn_reference(ffn_act)
    cap = {}
    got = model.ffn(0, h, cap)
    act = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}[ffn_act]
    up = h @ _w(model, "up_proj.weight").T + _w(model, "up_proj.bias")
    want = act(up) @ _w(model, "down_proj.weight").T + _w(model, "down_proj.bias")
    torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cap[0]["act_in"], up, rtol=1e-12, atol=1e-12)


def test_swiglu_ffn_formula():
    """W2 (swish(Wg h + bg) * (Wu h + bu)) + b2; the observer sees [gate | up]."""
    model, h = _ffn_reference("swiglu")
    cap = {}
    got = model.ffn(0, h, cap)
    gate = h @ _w(model, "gate_proj.weight").T + _w(model, "gate_proj.bias")
    up = h @ _w(model, "up_proj.weight").T + _w(model, "up_proj.bias")
    want = (F.silu(gate) * up) @ _w(model, "down_proj.weight").T + _w(model, "down_proj.bias")
    torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cap[0]["act_in"], torch.cat([gate, up], -1), rtol=1e-12, atol=1e-12)


class _Linear(nn.Module):
    """Stand-in for vLLM's parallel linear layers at TP 1: returns (output, None); a merged layer stacks its
    outputs (gate rows, then up rows), as MergedColumnParallelLinear does."""

    def __init__(self, input_size, output_size, bias=True, quant_config=None, prefix=""):
        super().__init__()
        self.prefix = prefix
        self.inner = nn.Linear(input_size, sum(output_size) if isinstance(output_size, list) else output_size,
                               bias=bias, dtype=torch.float64)

    def forward(self, x):
        return self.inner(x), None


@pytest.mark.parametrize("ffn_act", ["gelu", "gelu_tanh", "relu", "swiglu"])
def test_model_ffn_matches_reference(monkeypatch, ffn_act):
    ffn_module = pytest.importorskip("vllm_normswap.model.ffn")  # imports vLLM's linear layers (no engine)
    for name in ("ColumnParallelLinear", "MergedColumnParallelLinear", "RowParallelLinear"):
        monkeypatch.setattr(ffn_module, name, _Linear)
    model, h = _ffn_reference(ffn_act)
    ffn = ffn_module.make_ffn(model.arch, None, "model.layers.0.mlp")
    with torch.no_grad():
        if ffn_act in GATED_ACTS:
            ffn.gate_up_proj.inner.weight.copy_(torch.cat([_w(model, "gate_proj.weight"),
                                                          _w(model, "up_proj.weight")]))
            ffn.gate_up_proj.inner.bias.copy_(torch.cat([_w(model, "gate_proj.bias"), _w(model, "up_proj.bias")]))
        else:
            ffn.up_proj.inner.weight.copy_(_w(model, "up_proj.weight"))
            ffn.up_proj.inner.bias.copy_(_w(model, "up_proj.bias"))
        ffn.down_proj.inner.weight.copy_(_w(model, "down_proj.weight"))
        ffn.down_proj.inner.bias.copy_(_w(model, "down_proj.bias"))
        seen = {}
        got = ffn(h, lambda site, x: seen.__setitem__(site, x))
        cap = {}
        want = model.ffn(0, h, cap)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for site in ("act_in", "act_out"):
        torch.testing.assert_close(seen[site], cap[0][site], rtol=1e-10, atol=1e-10)


# ---- SwiGLU width rule and parameter counts -----------------------------------------------------------------

@pytest.mark.parametrize("gelu_width", [512, 1024, 3072, 4096, 11008, 96, 64])
def test_swiglu_width_rule(gelu_width):
    want = max(64, round(2 * gelu_width / 3 / 64) * 64)
    got = swiglu_width(gelu_width)
    assert got == want and got % 64 == 0
    # three matrices of width f' hold about as many weights as two of width f
    if gelu_width >= 1024:
        assert abs(3 * got - 2 * gelu_width) / (2 * gelu_width) < 0.05


def test_parameter_counts_within_two_percent():
    """At model sizes where the width rounding (to 64) is small against the width; the tests' 128-wide toy
    checkpoints are -3% (swiglu_width(512) = 320, not 341)."""
    from vllm_normswap.checkpoints.random_init import make_arch

    for hidden, layers in ((512, 8), (768, 12), (1024, 16)):
        arch = make_arch("ln-gelu", hidden_size=hidden, layers=layers, heads=max(2, hidden // 64))
        report = parameter_report(arch)
        assert set(report) == set(OPTIONS)
        base = report["ln-gelu"]["parameters"]
        for option, row in report.items():
            gated = OPTIONS[option].ffn_act in GATED_ACTS
            assert row["intermediate_size"] == (swiglu_width(4 * hidden) if gated else 4 * hidden), option
            assert abs(row["parameters"] - base) / base <= 0.02, (option, row, base)
            assert row["vs_baseline_pct"] == pytest.approx(100 * (row["parameters"] - base) / base, abs=1e-3)


# ---- CLI ------------------------------------------------------------------------------------------------------

def _help(argv, monkeypatch, capsys) -> str:
    from vllm_normswap import cli

    monkeypatch.setattr("sys.argv", ["normswap", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0, argv
    return capsys.readouterr().out


def test_cli_help(monkeypatch, capsys):
    from vllm_normswap.cli import SUBCOMMANDS

    out = _help(["--help"], monkeypatch, capsys)
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("command", ["serve", "params", "init", "quantize", "convert", "zoo", "ab", "plant",
                                     "int8-plan", "swap", "heal"])
def test_cli_subcommand_help(command, monkeypatch, capsys):
    from vllm_normswap.cli import SUBCOMMANDS

    if command not in SUBCOMMANDS:
        pytest.fail(f"subcommand {command!r} is gone from the CLI; update this test")
    out = _help([command, "--help"], monkeypatch, capsys)
    assert "usage: normswap" in out and command in out


def test_cli_knows_every_subcommand_here():
    from vllm_normswap.cli import SUBCOMMANDS

    assert set(SUBCOMMANDS) == {"serve", "params", "init", "quantize", "convert", "zoo", "ab", "plant", "int8-plan",
                                "swap", "heal"}
