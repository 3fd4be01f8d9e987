"""Layers point down: no import cycles in the package, and the model knows nothing of checkpoints/ or ab/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import import_cycles  # noqa: E402

UPPER = ("vllm_normswap.checkpoints", "vllm_normswap.ab")  # rooms the model must not reach


def _within(module: str, rooms) -> bool:
    return any(module == r or module.startswith(r + ".") for r in rooms)


def _reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in edges[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_no_import_cycles():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_cycles.py")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 cycle(s)" in result.stdout


def test_script_finds_a_cycle(tmp_path):
    """The script sees imports hidden in functions and relative imports, between modules and between rooms."""
    pkg = tmp_path / "vllm_normswap"
    for sub in ("model", "checkpoints"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "model" / "b.py").write_text("from vllm_normswap.model.a import f\n")
    (pkg / "model" / "c.py").write_text("from ..checkpoints import d\n")
    (pkg / "checkpoints" / "d.py").write_text("import vllm_normswap.model.a\n")
    found = import_cycles.all_cycles(import_cycles.graph(tmp_path))
    assert ["vllm_normswap.model.a", "vllm_normswap.model.b", "vllm_normswap.model.a"] in found
    assert ["vllm_normswap.checkpoints", "vllm_normswap.model", "vllm_normswap.checkpoints"] in found


def test_the_graph_holds_the_folders_mapped_into_the_package():
    """load_tests/ sits at the repository root and is vllm_normswap.load_tests once installed (pyproject.toml)."""
    assert import_cycles.package_dirs()["vllm_normswap.load_tests"] == ROOT / "load_tests"
    assert {"vllm_normswap.registry", "vllm_normswap.serve"} <= import_cycles.graph()["vllm_normswap.load_tests.soak"]


def test_model_imports_nothing_above_it():
    edges = import_cycles.graph()
    for module, targets in edges.items():
        if _within(module, ("vllm_normswap.model",)):
            assert not [t for t in targets if _within(t, UPPER)], f"{module} imports {targets}"
    reached = _reachable(edges, "vllm_normswap.model.vllm_model")
    assert not [m for m in reached if _within(m, UPPER)], sorted(reached)


def test_importing_the_vllm_model_loads_no_checkpoint_code():
    """The check anyone can run: python -c "import vllm_normswap.model.vllm_model" (imports vLLM, no engine)."""
    code = ("import sys, vllm_normswap.model.vllm_model; "
            "print(sorted(m for m in sys.modules if m.startswith(('vllm_normswap.checkpoints', 'vllm_normswap.ab'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
