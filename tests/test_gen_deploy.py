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
    assert order == ["ln-gelu", "ln-swiglu", "rms-gelu", "rms-swiglu"]  # :8001..:8004, as docs/monitoring.md states


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


def test_e2e_result_file_from_a_run():
    """bench_int8.py --save (one run): each int8 ratio is its tok/s over bf16's, the ceiling the run's own."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import int8_tables

    rates = {"bf16": (10.0, 40.0, 100.0), "normswap_int8": (15.0, 80.0, 420.0),
             "normswap_int8_lm_head": (18.0, 96.0, 430.0)}
    result = {"batches": [1, 8], "threads_bind": "0-1", "compiled": True, "rounds": 1, "device": "cpu",
              "model": {"params": 1.0e9}}
    for mode, (b1, b8, pre) in rates.items():
        result[mode] = {"decode_tok_s_batch1": b1, "decode_tok_s_batch8": b8, "prefill_tok_s_512": pre,
                        "weight_bytes": 2.0e9}
    result["int8_over_bf16"] = {"weight_bytes": 0.59, "decode_batch1_ceiling": 1.82}
    result["int8_lm_head_over_bf16"] = {"weight_bytes": 0.55, "decode_batch1_ceiling": 2.0}
    cpu = {"kind": "AVX2", "cores": 2, "model": "test CPU", "flags": ["avx2"]}
    table = int8_tables.e2e_table(result, cpu)
    assert table["columns"] == ["", "decode b1", "decode b8", "prefill 512", "weights", "b1 ceiling"]
    assert table["rows"][1] == ["int8 / bf16", "1.50x (15)", "2.00x (80)", "4.20x (420)", "0.59x", "1.82x"]
    assert table["rows"][2][1:] == ["1.80x (18)", "2.40x (96)", "4.30x (430)", "0.55x", "2.00x"]
    assert "2 threads" in table["title"] and "compiled" in table["title"]
