"""docs/adding-an-option.md holds, for two fifth options added to the registry at run time:
- PLAIN recombines existing choices (RMSNorm + tanh GELU), so no model code changes;
- GATED brings a new gated activation, GeGLU (registry.GATED_ACTS: "geglu" -> gate function "gelu"), whose
  formula model/activations.py and model/reference.py each already hold.
Each gets its servers, targets and serving config from scripts/gen_deploy.py, every checked file names exactly
what it lacks until then, and the model config, the random-checkpoint tools and the pure-torch reference take it.
GATED also runs in vLLM's model against the reference in fp32, and an activation whose gate function has no
formula fails in both at construction."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gen_deploy  # noqa: E402
from check_registry_files import check_files  # noqa: E402

from utils import make_checkpoint, random_prompts, run_vllm_offline  # noqa: E402
from vllm_normswap import registry  # noqa: E402
from vllm_normswap.registry import ACTIVATION_ROLE, NORM_ROLE, Option  # noqa: E402

PLAIN = Option("rms-gelu-tanh", 5, "rmsnorm", "gelu_tanh", NORM_ROLE, "change the norm to RMSNorm (tanh GELU)",
               "tab:purple")
GATED = Option("ln-geglu", 5, "layernorm", "geglu", ACTIVATION_ROLE, "change the activation to GeGLU", "tab:purple")
NEW_GATED_ACTS = {"geglu": "gelu"}  # GeGLU: gelu(h W_gate + b_gate) * (h W_up + b_up) (Shazeer 2020)
SAME_SHAPES = {PLAIN.id: "rms-gelu", GATED.id: "ln-swiglu"}  # an existing option with the new one's tensor shapes
# what check_registry_files.py reads; gen_deploy writes into the first four and the serving configs
CHECKED = ("docker-compose.yml", "deploy", "monitoring/prometheus", "monitoring/grafana/dashboards",
           gen_deploy.SERVING)
# vLLM in fp32 against the fp32 reference on the same weights: only summation order differs
FP32_LOGPROB_ATOL = 1e-3


def _add(monkeypatch, option: Option) -> dict[str, Option]:
    """The registry with ``option`` added in place (and its activation, if new), as an edit of registry.py would:
    every module that imported OPTIONS or GATED_ACTS sees it."""
    for act, gate in NEW_GATED_ACTS.items():
        if option.ffn_act == act:
            monkeypatch.setitem(registry.GATED_ACTS, act, gate)
    monkeypatch.setitem(registry.OPTIONS, option.id, option)
    return registry.OPTIONS


@pytest.fixture(params=[PLAIN, GATED], ids=["plain", "gated"])
def fifth(request, monkeypatch) -> Option:
    _add(monkeypatch, request.param)
    return request.param


@pytest.fixture
def tree(tmp_path) -> Path:
    for rel in CHECKED:
        src, dst = ROOT / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return tmp_path


def test_generation_adds_a_server_everywhere(fifth, tree):
    out = gen_deploy.generate(registry.OPTIONS, tree)
    compose = yaml.safe_load(out["docker-compose.yml"])["services"][fifth.id]
    assert compose["environment"]["NORMSWAP_OPTION"] == fifth.id and compose["ports"] == ["8005:8000"]
    assert fifth.id in yaml.safe_load(out["deploy/compose.gpu.yml"])["services"]
    k8s = [d for d in yaml.safe_load_all(out["deploy/k8s/servers.yaml"]) if d]
    assert {d["kind"] for d in k8s if d["metadata"]["name"] == fifth.id} == {"Deployment", "Service"}
    targets = yaml.safe_load(out["monitoring/prometheus/targets/compose.yml"])
    assert {"targets": [f"{fifth.id}:8000"], "labels": {"option": fifth.id}} in targets
    config = yaml.safe_load(out[f"{gen_deploy.SERVING}/{fifth.id}.yaml"])
    assert config["served-model-name"] == fifth.id and config["hf-overrides"]["expect_option"] == fifth.id


def test_checked_files_lack_exactly_what_generation_writes(fifth, tree):
    options = registry.OPTIONS
    before = check_files(options, root=tree)
    generated = gen_deploy.stale(options, tree)
    assert {p.split(":")[0] for p in before} == set(generated), before
    assert all(repr(fifth.id) in p for p in before), before
    assert gen_deploy.write(options, tree) == sorted(generated)
    assert check_files(options, root=tree) == []
    assert gen_deploy.stale(options, tree) == {}
    four = {k: o for k, o in options.items() if k != fifth.id}
    assert check_files(four, root=ROOT) == [] and gen_deploy.stale(four) == {}  # the repository was not touched


def test_model_config_and_checkpoint_tools_take_it(fifth):
    from vllm_normswap.checkpoints.random_init import make_arch
    from vllm_normswap.model.config import NormSwapArch, parameter_report

    arch = make_arch(fifth.id, hidden_size=64, layers=2, heads=2, vocab_size=128, max_positions=32)
    assert (arch.norm_type, arch.ffn_act, arch.gated) == (fifth.norm_type, fifth.ffn_act, fifth is GATED)
    report = parameter_report(NormSwapArch(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=256,
                                           max_position_embeddings=32))
    assert set(report) == set(registry.OPTIONS)
    assert report[fifth.id]["vs_baseline_pct"] == report[SAME_SHAPES[fifth.id]]["vs_baseline_pct"]


def _gelu_erf(x):  # x Phi(x), through the normal CDF rather than erf as the reference writes it
    return x * torch.distributions.Normal(0.0, 1.0).cdf(x)


def test_reference_model_runs_a_random_checkpoint_of_it(fifth):
    from vllm_normswap.checkpoints.random_init import make_arch
    from vllm_normswap.model.reference import ReferenceModel

    arch = make_arch(fifth.id, hidden_size=64, layers=2, heads=2, vocab_size=128, max_positions=32)
    model = ReferenceModel(arch)
    model.reset_parameters(seed=0)
    capture: dict = {}
    logits = model(torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)), capture=capture)
    assert logits.shape == (2, 16, 128) and torch.isfinite(logits).all()
    assert set(capture[0]) == set(registry.SITES)
    act_in = capture[0]["act_in"]
    if fifth is GATED:  # the observer sees [gate | up]; GeGLU = gelu(gate) * up
        gate, up = act_in.chunk(2, dim=-1)
        want = _gelu_erf(gate) * up
    else:  # GPT-2's tanh GELU, written out here independently of the reference
        want = 0.5 * act_in * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (act_in + 0.044715 * act_in ** 3)))
    torch.testing.assert_close(capture[0]["act_out"], want, rtol=1e-5, atol=1e-6)


def test_vllm_model_matches_the_reference_in_fp32(monkeypatch, tmp_path):
    """GeGLU served by vLLM's NormSwapForCausalLM (model/ffn.py) against the pure-torch reference
    (model/reference.py), both in fp32 on the same weights: prompt logprobs per token, and greedy tokens wherever
    the reference's top-1 margin is clear."""
    from vllm_normswap.checkpoints.files import load_reference

    _add(monkeypatch, GATED)
    ckpt = make_checkpoint(tmp_path / GATED.id, GATED.id)
    prompts = random_prompts(3, seed=5, lengths=(8, 40))
    result = run_vllm_offline({"model": str(ckpt), "prompts": prompts, "max_tokens": 8, "dtype": "float32",
                               "gated_acts": NEW_GATED_ACTS})
    ref = load_reference(ckpt)
    diffs = torch.tensor([abs(a - b) for ids, got in zip(prompts, result["prompt_logprobs"])
                          for a, b in zip(got, ref.prompt_logprobs(ids))])
    print(f"fp32 prompt logprobs: max |diff| {diffs.max():.2e} over {len(diffs)} tokens")
    assert len(diffs) == sum(len(p) - 1 for p in prompts) and diffs.max() < FP32_LOGPROB_ATOL
    for ids, got in zip(prompts, result["greedy"]):
        logits = ref.forward(torch.tensor(ids + got))[len(ids) - 1: -1]
        top = logits.topk(2, dim=-1)
        clear = (top.values[:, 0] - top.values[:, 1]) > 10 * FP32_LOGPROB_ATOL
        assert [g for g, c in zip(got, clear) if c] == [w for w, c in zip(top.indices[:, 0].tolist(), clear) if c]


def test_a_gate_function_without_a_formula_fails_in_both_models(monkeypatch):
    """registry.GATED_ACTS naming a function that neither model writes: both refuse to build, naming the file to
    extend, instead of computing another activation."""
    from vllm_normswap.checkpoints.random_init import make_arch
    from vllm_normswap.model.reference import ReferenceModel

    ffn = pytest.importorskip("vllm_normswap.model.ffn")  # imports vLLM's linear layers (no engine)
    monkeypatch.setitem(registry.GATED_ACTS, "mishglu", "mish")
    monkeypatch.setitem(registry.OPTIONS, "ln-mishglu", Option("ln-mishglu", 6, "layernorm", "mishglu",
                                                               ACTIVATION_ROLE, "change the activation", "tab:gray"))
    arch = make_arch("ln-mishglu", hidden_size=64, layers=1, heads=1, vocab_size=128, max_positions=32)
    with pytest.raises(NotImplementedError, match="'mish'.*model/reference.py"):
        ReferenceModel(arch)
    with pytest.raises(NotImplementedError, match="'mish'.*model/activations.py"):
        ffn.make_ffn(arch, None, "model.layers.0.mlp")
