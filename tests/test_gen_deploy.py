"""The deployment files that list the options are what scripts/gen_deploy.py generates from the registry, and its
serving-config template is the existing configs' text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gen_deploy  # noqa: E402

from vllm_normswap.registry import OPTIONS  # noqa: E402


def test_committed_files_are_up_to_date():
    assert gen_deploy.stale() == {}, "run: python scripts/gen_deploy.py"


def test_check_exits_0_on_the_committed_files():
    proc = subprocess.run([sys.executable, "scripts/gen_deploy.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("option", list(OPTIONS))
def test_serving_config_template_is_the_existing_configs_text(option):
    """Below the header line, the template reproduces every existing serving config byte for byte."""
    existing = (ROOT / gen_deploy.SERVING / f"{option}.yaml").read_text()
    generated = gen_deploy.render_serving_config(OPTIONS[option])
    assert generated.splitlines()[1:] == existing.splitlines()[1:]
    assert generated.startswith(f"# Option {OPTIONS[option].case_study}: ")


def test_servers_keep_their_ports_baseline_first():
    order = [o.id for o in gen_deploy.server_order(OPTIONS)]
    assert order == ["ln-gelu", "ln-swiglu", "rms-gelu", "rms-swiglu"]  # :8001..:8004, as README states


def test_a_stale_block_is_listed_and_rewritten(tmp_path):
    for path in gen_deploy.BLOCKS:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text((ROOT / path).read_text())
    (tmp_path / gen_deploy.SERVING).mkdir(parents=True)
    for option in OPTIONS:
        (tmp_path / gen_deploy.SERVING / f"{option}.yaml").write_text("hand-written\n")
    target = tmp_path / "monitoring/prometheus/targets/compose.yml"
    target.write_text(target.read_text().replace("rms-swiglu:8000", "rms-swiglu:9000"))
    assert sorted(gen_deploy.stale(root=tmp_path)) == ["monitoring/prometheus/targets/compose.yml"]
    assert gen_deploy.write(root=tmp_path) == ["monitoring/prometheus/targets/compose.yml"]
    assert target.read_text() == (ROOT / "monitoring/prometheus/targets/compose.yml").read_text()
    assert (tmp_path / gen_deploy.SERVING / "ln-gelu.yaml").read_text() == "hand-written\n"  # never rewritten


def test_a_file_without_markers_is_an_error_naming_them(tmp_path):
    with pytest.raises(SystemExit, match="BEGIN generated"):
        gen_deploy.replace_block("x.yml", "services:\n  a: 1\n", "")


def test_benchmark_readme_is_rendered_from_the_results():
    proc = subprocess.run([sys.executable, "benchmarks/render_readme.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
