"""The files that cannot import the registry (compose, k8s, Prometheus, Grafana, serving configs) agree with it,
and a registry with a fifth option makes each of them name exactly what it lacks, by file and line."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from check_registry_files import check_files, serving_dir  # noqa: E402

from vllm_normswap.registry import ACTIVATION_ROLE, OPTIONS, SITES, Option  # noqa: E402

GEGLU = Option("ln-geglu", 5, "layernorm", "geglu", ACTIVATION_ROLE, "change the activation to GeGLU", "tab:purple")
CHECKED = ("docker-compose.yml", "deploy", "monitoring/prometheus", "monitoring/grafana/dashboards")


def _line(path: str, text: str, root: Path = ROOT) -> int:
    return next(n for n, line in enumerate((root / path).read_text().splitlines(), 1) if line.startswith(text))


def _copy(tmp_path: Path) -> Path:
    for rel in CHECKED + (str(serving_dir(ROOT).relative_to(ROOT)),):
        src, dst = ROOT / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return tmp_path


def test_files_agree_with_the_registry():
    assert check_files() == []


def test_a_fifth_option_is_missing_from_each_file_by_line():
    options = {**OPTIONS, GEGLU.id: GEGLU}
    serving = serving_dir(ROOT).relative_to(ROOT)
    first_deployment = _line("deploy/k8s/servers.yaml", "apiVersion: apps/v1")
    assert sorted(check_files(options)) == sorted([
        f"docker-compose.yml:{_line('docker-compose.yml', 'services:')}: missing service for option 'ln-geglu'",
        f"deploy/compose.gpu.yml:{_line('deploy/compose.gpu.yml', 'services:')}: missing service for option "
        "'ln-geglu'",
        f"deploy/k8s/servers.yaml:{first_deployment}: missing Deployment for option 'ln-geglu'",
        f"deploy/k8s/servers.yaml:{first_deployment}: missing Service for option 'ln-geglu'",
        f"monitoring/prometheus/targets/compose.yml:{_line('monitoring/prometheus/targets/compose.yml', '- ')}: "
        "missing target for option 'ln-geglu'",
        f"{serving}/ln-geglu.yaml:0: missing file: the serving config of option 'ln-geglu'",
    ])  # Prometheus config, rules and the dashboard select options by label: nothing to add there


def test_an_option_removed_from_the_registry_is_extra_everywhere():
    options = {k: v for k, v in OPTIONS.items() if k != "rms-gelu"}
    problems = check_files(options)
    files = sorted({p.split(":")[0] for p in problems})
    assert files == sorted(["docker-compose.yml", "deploy/compose.gpu.yml", "deploy/k8s/ab-job.yaml",
                            "deploy/k8s/locust.yaml", "deploy/k8s/servers.yaml",
                            "monitoring/prometheus/targets/compose.yml",
                            f"{serving_dir(ROOT).relative_to(ROOT)}/rms-gelu.yaml"]), problems
    assert all("'rms-gelu'" in p or "rms-gelu:8000" in p for p in problems), problems


def test_a_new_site_is_missing_from_the_dashboard():
    problems = check_files(sites=SITES + ("gate_out",))
    assert len(problems) == 1 and problems[0].startswith("monitoring/grafana/dashboards/normswap-ab.json:")
    assert "gate_out" in problems[0] and "dashboard.py" in problems[0]


@pytest.mark.parametrize("path, old, new, expect", [
    ("monitoring/prometheus/targets/compose.yml", "labels: {option: rms-swiglu}", "labels: {option: rms-swiglu2}",
     ["missing target for option 'rms-swiglu'", "extra target 'rms-swiglu2'", "labelled option='rms-swiglu2'"]),
    ("docker-compose.yml", "NORMSWAP_OPTION: rms-gelu", "NORMSWAP_OPTION: rms-swiglu",
     ["service 'rms-gelu' sets NORMSWAP_OPTION='rms-swiglu'"]),
    ("monitoring/prometheus/rules/alerts.yml", 'site="act_out", threshold="6"} > 0.001',
     'site="act_out", threshold="7"} > 0.001', ["threshold '7' is not a default threshold"]),
    ("monitoring/prometheus/rules/recording.yml", "normswap_activation_absmax)", "normswap_activation_amax)",
     ["series 'normswap_activation_amax' is not a registry metric"]),
])
def test_an_edited_file_is_named_with_its_line(tmp_path, path, old, new, expect):
    root = _copy(tmp_path)
    text = (root / path).read_text()
    assert text.count(old) == 1
    (root / path).write_text(text.replace(old, new))
    line = text[: text.index(old)].count("\n") + 1
    problems = check_files(root=root)
    assert len(problems) == len(expect), problems
    for want in expect:
        assert any(want in p for p in problems), (want, problems)
    assert any(p.startswith(f"{path}:{line}:") for p in problems), (line, problems)


def test_a_serving_config_with_the_wrong_number(tmp_path):
    root = _copy(tmp_path)
    path = serving_dir(root) / "ln-gelu.yaml"
    path.write_text(path.read_text().replace("# Option 4", "# Option 1"))
    assert check_files(root=root) == [f"{path.relative_to(root)}:1: the header must name the option's case-study "
                                      "number: '# Option 4'"]


def test_the_fifth_option_is_a_plain_registry_entry():
    assert dataclasses.replace(GEGLU).fields == {"norm_type": "layernorm", "ffn_act": "geglu"}
