"""The package works from its wheel: build it, install it with ``pip install --no-deps --target`` outside the
repository (its dependencies come from this venv's site-packages; nothing from the checkout on ``sys.path``),
and from there serve ln-gelu through the ``normswap`` script and run a one-option ``normswap ab`` to a report.
serving_configs/ and load_tests/ sit at the repository root, once; pyproject.toml maps them into the package
(``vllm_normswap.serving_configs``, ``vllm_normswap.load_tests``), for the wheel and the checkout's editable install.

Every process runs with its working directory outside the repository and ``PYTHONPATH`` = the target directory
only, so ``python -m ...`` (vLLM's server is started that way) cannot pick the checkout up from the cwd either.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from utils import KV_CACHE_GB, get_open_port, port_holders
from vllm_normswap.runtime.engine_fork import ENV as FORK_ENV, FORK_LOG
from vllm_normswap.runtime.server import VLLMServer

REPO = Path(__file__).resolve().parents[1]
ROOT_FOLDERS = ("serving_configs", "load_tests")  # at the repository root, package data in the wheel
pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(target dir, env, cwd) of a wheel install of this checkout."""
    root = tmp_path_factory.mktemp("wheel")
    dist, target, cwd = root / "dist", root / "site", root / "cwd"
    cwd.mkdir()
    # --no-build-isolation: the build backend (setuptools) from this venv; CI has no index to fetch it from
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, cwd=cwd, timeout=600)
    (wheel,) = dist.glob("vllm_normswap-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, cwd=cwd, timeout=600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST"))}
    # FORK_ENV=0: vLLM's default start (spawn), as after `pip install` (the rest of the suite forks: conftest.py)
    env |= {"PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1", "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GB, FORK_ENV: "0"}
    return target, env, cwd


def normswap(installed) -> str:
    target, _, _ = installed
    script = target / "bin" / "normswap"
    assert script.is_file(), "the wheel's console script"
    return str(script)


def test_the_checkout_reads_the_root_folders():
    """The editable install (scripts/install.sh) finds both folders at the repository root: no copy inside the
    package. From outside the repository, so the checkout is reached through the install only."""
    probe = ("import importlib.util as u, vllm_normswap.serve as s, vllm_normswap.ab.loadgen as l;"
             "print(s.serving_config_path('ln-gelu')); print(l.LOCUSTFILE);"
             "print(u.find_spec('vllm_normswap.load_tests.locustfile').origin)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(sys.executable).anchor, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out == [str(REPO / "serving_configs" / "ln-gelu.yaml"), str(REPO / "load_tests" / "locustfile.py"),
                   str(REPO / "load_tests" / "locustfile.py")]
    assert not [f for f in ROOT_FOLDERS if (REPO / "vllm_normswap" / f).exists()], "one copy, at the root"
    printed = subprocess.run([str(Path(sys.executable).with_name("normswap")), "serve", "rms-gelu",
                              "--print-config"], cwd=Path(sys.executable).anchor, capture_output=True, text=True,
                             timeout=120)
    assert printed.returncode == 0 and printed.stdout == (REPO / "serving_configs" / "rms-gelu.yaml").read_text()


def test_wheel_carries_the_root_folders_and_every_module(installed):
    """Every file of serving_configs/ and load_tests/, and every module of the checkout's package (pyproject.toml
    lists the packages: a new subpackage left out of the list would be missing here)."""
    target, _, _ = installed
    (wheel,) = (target.parent / "dist").glob("vllm_normswap-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    root_files = {f"vllm_normswap/{folder}/{f.name}" for folder in ROOT_FOLDERS for f in (REPO / folder).iterdir()
                  if f.is_file() and not f.name.startswith(".")}
    assert {"vllm_normswap/serving_configs/ln-gelu.yaml", "vllm_normswap/load_tests/locustfile.py",
            "vllm_normswap/load_tests/README.md"} <= root_files
    modules = {f.relative_to(REPO).as_posix() for f in (REPO / "vllm_normswap").rglob("*.py")}
    assert not (root_files | modules) - names, sorted((root_files | modules) - names)


def test_wheel_holds_the_package_data_and_nothing_from_the_checkout(installed):
    target, env, cwd = installed
    probe = ("import sys, vllm_normswap, vllm_normswap.serve as s, vllm_normswap.ab.loadgen as l;"
             "print(vllm_normswap.__file__); print(s.serving_config_path('ln-gelu')); print(l.LOCUSTFILE);"
             "print('\\n'.join(p for p in sys.path if p))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    module, config, locustfile, *path = out
    for f in (module, config, locustfile):
        assert Path(f).is_relative_to(target) and Path(f).is_file(), f
    # the venv's site-packages may sit under the repository directory; the checkout itself must not be on the path
    assert not [p for p in path if Path(p).resolve() == REPO or (Path(p) / "vllm_normswap").resolve()
                == REPO / "vllm_normswap"], path
    assert (target / "vllm_normswap" / "zoo" / "ln-gelu" / "model.safetensors").is_file()
    version = subprocess.run([normswap(installed), "--version"], env=env, cwd=cwd, capture_output=True, text=True,
                             timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("normswap "), version
    printed = subprocess.run([normswap(installed), "serve", "ln-gelu", "--print-config"], env=env, cwd=cwd,
                             capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0 and printed.stdout == Path(config).read_text()


def test_serve_from_the_wheel_answers_a_completion(installed, tmp_path):
    import openai

    target, env, cwd = installed
    port = get_open_port()
    argv = [normswap(installed), "serve", "ln-gelu", "--port", str(port), "--", "--enforce-eager"]
    with VLLMServer(argv, tmp_path / "serve.log", env=env, port=port, startup_timeout=600, cwd=cwd) as server:
        log = server.log_tail(200_000)
        assert FORK_LOG not in log, "the default start spawns EngineCore and the worker"
        assert len(port_holders(server)) == 1, port_holders(server)  # only the API server holds its port
        assert str(target / "vllm_normswap" / "serving_configs" / "ln-gelu.yaml") in " ".join(server.argv) or \
            "ln-gelu" in log
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        completion = client.completions.create(model="ln-gelu", prompt="def main(", max_tokens=4, temperature=0)
        assert completion.choices[0].text and completion.usage.completion_tokens == 4


def ab_flags(help_text: str, out: Path) -> list[str]:
    """The smallest one-option run, with only the flags this `normswap ab` knows (its flags are evolving)."""
    wanted = [("--options", "ln-gelu"), ("--precisions", "bf16"), ("--probe-shifts", ""), ("--docs", "2"),
              ("--doc-tokens", "64"), ("--prompts", "4"), ("--max-tokens", "4"), ("--users", "1"),
              ("--requests", "4"), ("--min-requests", "4"), ("--load-seconds", "5"), ("--rounds", "1"),
              ("--warmup-max-s", "20"), ("--self-noise", "off"), ("--probe-grid", "0,4")]
    flags = [x for flag, value in wanted if f"{flag} " in help_text or f"{flag}\n" in help_text
             for x in (flag, value)]
    return flags + ["--out", str(out)]


def test_ab_from_the_wheel_writes_a_report(installed, tmp_path):
    _, env, cwd = installed
    help_text = subprocess.run([normswap(installed), "ab", "--help"], env=env, cwd=cwd, capture_output=True,
                               text=True, timeout=120, check=True).stdout
    out = tmp_path / "runs"
    # the documented faster start (docs/serving.md), from the wheel's plugin entry point; serve above spawns
    proc = subprocess.run([normswap(installed), "ab", *ab_flags(help_text, out)], env={**env, FORK_ENV: "1"},
                          cwd=cwd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    reports = sorted(out.rglob("report.md")) + sorted(out.rglob("report.html"))
    assert reports, f"no report under {out}: {sorted(p.name for p in out.rglob('*'))[:50]}"
    logs = sorted(out.rglob("logs/*.log"))
    assert logs and all(FORK_LOG in log.read_text(errors="replace") for log in logs), logs
