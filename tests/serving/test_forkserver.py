"""The fork server (vllm_normswap/runtime/forkserver.py): a forked child must behave as the same command line started anew.
The rules (which command lines and environments may fork) are pure logic; the rest runs a real fork server, a real
script and a real vLLM server, and compares them with ``subprocess`` on the same command line."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from utils import RemoteOpenAIServer
from vllm_normswap.runtime import forkserver

SCRIPT = """
import atexit, os, sys
atexit.register(print, "atexit ran")  # vLLM's shutdown and our engine-died exit code hang on atexit hooks
print("argv", sys.argv[1:], "main", __name__, "path0", sys.path[0] == os.path.dirname(os.path.abspath(__file__)))
print("cwd", os.getcwd(), "env", os.environ.get("NORMSWAP_PROBE"), "pgid==pid", os.getpgid(0) == os.getpid())
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def test_command_lines_that_fork():
    py = sys.executable
    assert forkserver.target([py, "-m", "vllm.entrypoints.launchers.api_server.entry", "--port", "1"]) == (
        "module", "vllm.entrypoints.launchers.api_server.entry", ["--port", "1"])
    assert forkserver.target([py, __file__, "x"]) == ("path", __file__, ["x"])
    assert forkserver.target(["/usr/bin/env", "python", "-m", "x"]) is None  # another program
    assert forkserver.target([py, "-X", "dev", "-m", "x"]) is None  # interpreter options change the interpreter
    assert forkserver.target([py, "no_such_script.py"]) is None


def test_environments_that_fork():
    base = {"PATH": "/bin", "OMP_NUM_THREADS": "2", forkserver.ENV: "1"}
    late = {**base, "VLLM_CPU_KVCACHE_SPACE": "3", "VLLM_CPU_OMP_THREADS_BIND": "0|1", "NORMSWAP_INT8_KERNEL": "dequant"}
    assert forkserver.env_mismatch(late, base) == []
    # read when torch and vLLM are imported: a child forked after the import would not see the new value
    assert forkserver.env_mismatch({**base, "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "DEBUG"}, base) == [
        "OMP_NUM_THREADS", "VLLM_LOGGING_LEVEL"]
    assert forkserver.env_mismatch({k: v for k, v in base.items() if k != "PATH"}, base) == ["PATH"]
    argv = [sys.executable, "-m", "x"]
    assert forkserver.can_fork(argv, {**os.environ, forkserver.ENV: "0"}) is not None
    assert "OMP_NUM_THREADS" in forkserver.can_fork(argv, {**os.environ, forkserver.ENV: "1", "OMP_NUM_THREADS": "7"})


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(SCRIPT)
    return path


def test_forked_script_matches_a_new_process(script, tmp_path):
    env = {**os.environ, forkserver.ENV: "1", "NORMSWAP_PROBE": "late-read value"}
    argv = [sys.executable, str(script), "3", "and more"]
    fresh = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                           start_new_session=True)  # a forked child leads its own session too
    forked = forkserver.run(argv, env=env, timeout=600, cwd=tmp_path)
    assert forkserver.can_fork(argv, env) is None
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert fresh.returncode == 3 and "main __main__ path0 True" in fresh.stdout and "late-read value" in fresh.stdout
    assert fresh.stdout.endswith("atexit ran\n")


def test_forked_script_timeout_kills_it(tmp_path):
    (tmp_path / "sleep.py").write_text("import time\ntime.sleep(600)\n")
    env = {**os.environ, forkserver.ENV: "1"}
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        forkserver.run([sys.executable, str(tmp_path / "sleep.py")], env=env, timeout=2)
    assert time.monotonic() - t0 < 600


@pytest.mark.server
def test_forked_server_serves_and_exits_like_popen(checkpoints, tmp_path):
    """A forked server answers, its engine processes hang below it, SIGINT stops all of them with exit code 0, and a
    killed server reports -9, as Popen would."""
    fork = {forkserver.ENV: "1"}  # as tests/conftest.py sets it, also where a developer turned it off
    with RemoteOpenAIServer("ln-gelu", checkpoints["ln-gelu"], tmp_path / "a.log", extra=["--enforce-eager"],
                            env=fork) as s:
        assert isinstance(s.proc, forkserver.ForkedProcess)
        assert psutil.Process(s.proc.pid).ppid() == forkserver.get().proc.pid
        engine = psutil.Process(s.proc.pid).children(recursive=True)
        assert engine, "EngineCore runs below the forked server"
        out = s.get_client().completions.create(model="ln-gelu", prompt=[1, 2, 3], max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4
    assert s.proc.returncode == 0, s.log_tail()
    gone, alive = psutil.wait_procs(engine, timeout=30)
    assert not alive, f"engine processes left behind: {alive}"
    assert "Application startup complete" in s.log_path.read_text()  # the server's own output reached its log

    killed = RemoteOpenAIServer("ln-gelu", checkpoints["ln-gelu"], tmp_path / "b.log", extra=["--enforce-eager"],
                                env=fork)
    killed.start()
    assert isinstance(killed.proc, forkserver.ForkedProcess)
    os.killpg(killed.proc.pid, signal.SIGKILL)
    assert killed.proc.wait(timeout=30) == -signal.SIGKILL
    killed.stop()
