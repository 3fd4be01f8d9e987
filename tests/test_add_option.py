"""README's "Adding an option" holds: a fifth option added to the registry at run time (an existing activation, so
no model code changes) gets its servers, targets and serving config from scripts/gen_deploy.py, every checked file
names exactly what it lacks until then, and the model config, the random-checkpoint tools and the pure-torch
reference take it."""

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

from vllm_normswap import registry  # noqa: E402
from vllm_normswap.registry import NORM_ROLE, Option  # noqa: E402

FIFTH = Option("rms-gelu-tanh", 5, "rmsnorm", "gelu_tanh", NORM_ROLE, "change the norm to RMSNorm (tanh GELU)",
               "tab:purple")
# what check_registry_files.py reads; gen_deploy writes into the first four and the serving configs
CHECKED = ("docker-compose.yml", "deploy", "monitoring/prometheus", "monitoring/grafana/dashboards",
           gen_deploy.SERVING)


@pytest.fixture
def fifth(monkeypatch):
    """The registry with FIFTH added in place, so every module that imported OPTIONS sees it."""
    monkeypatch.setitem(registry.OPTIONS, FIFTH.id, FIFTH)
    return registry.OPTIONS


@pytest.fixture
def tree(tmp_path) -> Path:
    for rel in CHECKED:
        src, dst = ROOT / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return tmp_path


def test_generation_adds_a_server_everywhere(fifth, tree):
    out = gen_deploy.generate(fifth, tree)
    compose = yaml.safe_load(out["docker-compose.yml"])["services"][FIFTH.id]
    assert compose["environment"]["NORMSWAP_OPTION"] == FIFTH.id and compose["ports"] == ["8005:8000"]
    assert FIFTH.id in yaml.safe_load(out["deploy/compose.gpu.yml"])["services"]
    k8s = [d for d in yaml.safe_load_all(out["deploy/k8s/servers.yaml"]) if d]
    assert {d["kind"] for d in k8s if d["metadata"]["name"] == FIFTH.id} == {"Deployment", "Service"}
    targets = yaml.safe_load(out["monitoring/prometheus/targets/compose.yml"])
    assert {"targets": [f"{FIFTH.id}:8000"], "labels": {"option": FIFTH.id}} in targets
    config = yaml.safe_load(out[f"{gen_deploy.SERVING}/{FIFTH.id}.yaml"])
    assert config["served-model-name"] == FIFTH.id and config["hf-overrides"]["expect_option"] == FIFTH.id


def test_checked_files_lack_exactly_what_generation_writes(fifth, tree):
    before = check_files(fifth, root=tree)
    generated = gen_deploy.stale(fifth, tree)
    assert {p.split(":")[0] for p in before} == set(generated), before
    assert all(repr(FIFTH.id) in p for p in before), before
    assert gen_deploy.write(fifth, tree) == sorted(generated)
    assert check_files(fifth, root=tree) == []
    assert gen_deploy.stale(fifth, tree) == {}
    four = {k: o for k, o in fifth.items() if k != FIFTH.id}
    assert check_files(four, root=ROOT) == [] and gen_deploy.stale(four) == {}  # the repository was not touched


def test_model_config_and_checkpoint_tools_take_it(fifth):
    from vllm_normswap.checkpoints.random_init import make_arch
    from vllm_normswap.model.config import NormSwapArch, parameter_report

    arch = make_arch(FIFTH.id, hidden_size=64, layers=2, heads=2, vocab_size=128, max_positions=32)
    assert (arch.norm_type, arch.ffn_act) == (FIFTH.norm_type, FIFTH.ffn_act)
    report = parameter_report(NormSwapArch(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=256,
                                           max_position_embeddings=32))
    assert set(report) == set(fifth)
    assert report[FIFTH.id]["vs_baseline_pct"] == report["rms-gelu"]["vs_baseline_pct"]  # same shapes


def test_reference_model_runs_a_random_checkpoint_of_it(fifth):
    from vllm_normswap.checkpoints.random_init import make_arch
    from vllm_normswap.model.reference import ReferenceModel

    arch = make_arch(FIFTH.id, hidden_size=64, layers=2, heads=2, vocab_size=128, max_positions=32)
    model = ReferenceModel(arch)
    model.reset_parameters(seed=0)
    capture: dict = {}
    logits = model(torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)), capture=capture)
    assert logits.shape == (2, 16, 128) and torch.isfinite(logits).all()
    assert set(capture[0]) == set(registry.SITES)
    up = capture[0]["act_in"]  # GPT-2's tanh GELU, written out here independently of the reference
    tanh_gelu = 0.5 * up * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (up + 0.044715 * up ** 3)))
    torch.testing.assert_close(capture[0]["act_out"], tanh_gelu)
