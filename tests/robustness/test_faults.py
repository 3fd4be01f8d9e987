"""Faults: the engine process killed under load, a restart over the same Prometheus multiprocess directory, an
unusable Prometheus directory; and what is loaded: safetensors only (a pickle next to them is never opened) and
no remote code.

- EngineCore SIGKILLed while good requests run: /health stops answering 200 within HEALTH_FAIL_S, the API server
  process exits non-zero within EXIT_S, and no process of its group is left behind;
- restart with the same PROMETHEUS_MULTIPROC_DIR (the killed run's files are still there): the observer's
  counters start from zero and then count exactly the new tokens, vLLM's own series stay on /metrics, and the
  booby-trapped pytorch_model.bin beside the safetensors is never unpickled;
- PROMETHEUS_MULTIPROC_DIR that cannot be written: the server stops before serving, naming the variable.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from robustness_traffic import OPTION, GoodTraffic, bad, watch
from observe.observe_helpers import complete, observe_prompts, sample, wait_for_elements
from utils import KV_CACHE_GB, RemoteOpenAIServer, health, metrics_text, server_argv
from vllm_normswap.serve import SERVING_CONFIGS

pytestmark = pytest.mark.server
HEALTH_FAIL_S = 10.0  # /health must stop answering 200 this soon after the engine dies
EXIT_S = 60.0  # ... and the API server must be gone this soon (vLLM's watchdog checks every 5 s)
ORPHANS_S = 30.0  # ... and every process it started gone this soon after
ENV = {"VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GB}
D = 128  # hidden size of the test checkpoints: elements per token at norm_in and ffn_out


class Trap:
    """A pickle that, if ever unpickled, creates ``marker`` (torch.load without weights_only would run it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def add_pickle_trap(ckpt: Path, marker: Path) -> None:
    import pickle

    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Trap(marker)}))


def server(ckpt, log, env) -> RemoteOpenAIServer:
    def argv(port):
        cmd = server_argv(OPTION, str(ckpt), port,
                          extra=["--enforce-eager", "--max-model-len", str(bad.MAX_MODEL_LEN)])
        if os.environ.get("ROBUSTNESS_SERVER_SHIM"):  # a script run in place of `-m ENTRYPOINT`
            cmd[1:3] = [os.environ["ROBUSTNESS_SERVER_SHIM"]]
        return cmd
    return RemoteOpenAIServer(OPTION, argv=argv, log_path=log, env=env)


def _alive(pids):
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append((pid, psutil.Process(pid).name()))
        except psutil.NoSuchProcess:
            pass
    return alive


def engine_core(s: RemoteOpenAIServer) -> psutil.Process:
    children = psutil.Process(s.proc.pid).children(recursive=True)
    for p in children:
        try:
            if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no EngineCore among {[(p.pid, p.name()) for p in children]}")


def test_engine_killed_then_clean_restart(checkpoints, tmp_path):
    import shutil

    prom = tmp_path / "prom"
    prom.mkdir()
    env = {**ENV, "PROMETHEUS_MULTIPROC_DIR": str(prom)}
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints[OPTION], ckpt)
    marker = tmp_path / "pickle-was-loaded"
    add_pickle_trap(ckpt, marker)

    first = server(ckpt, tmp_path / "killed.log", env).start().wait_healthy()
    group = [first.proc.pid] + [p.pid for p in psutil.Process(first.proc.pid).children(recursive=True)]
    traffic = GoodTraffic(first.url, users=2)
    try:
        traffic.start()
        deadline = time.monotonic() + 60
        while traffic.ok < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert traffic.ok >= 3, f"no good traffic before the kill: {traffic.failures[:2]}"
        assert list(prom.glob("*_normswap-*.db")), "observer files should be in the operator's directory"
        engine_core(first).send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while health(first.url) == 200:
            assert time.monotonic() - killed < HEALTH_FAIL_S, "/health still 200 after the engine died"
            time.sleep(0.1)
        health_fail_s = time.monotonic() - killed
        try:
            code = first.wait_exit(timeout=EXIT_S)
        except Exception:
            raise AssertionError(f"API server still running {EXIT_S}s after its engine died (hung):\n"
                                 f"{first.log_tail()}") from None
        exit_s = time.monotonic() - killed
    finally:
        traffic.stop()
        first.stop()
    print(f"\nFAULT engine killed: /health failed after {health_fail_s:.1f}s, server exited {code} after "
          f"{exit_s:.1f}s")
    deadline = time.monotonic() + ORPHANS_S  # the worker notices its dead parent and leaves on its own
    while (left := _alive(group)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind {ORPHANS_S}s after the server exited: {left}"
    assert not [f for f in traffic.failures if "Connection" not in f and "500" not in f], traffic.failures[:3]

    # restart over the same directory: the killed run's observer files are removed, counters start at zero
    with server(ckpt, tmp_path / "restart.log", env) as second:
        before, _ = watch.scrape(second.url)
        stale = {k: v for k, v in before.items() if k[0].startswith("normswap_") and v}
        assert not stale, f"restart shows the killed run's values: {list(stale.items())[:3]}"
        with requests.Session() as session:
            assert bad.good_completion(session, second.url, OPTION, [5, 6, 7], max_tokens=4) == 4
        # ... and then count exactly the restarted server's tokens, next to vLLM's own series on one endpoint
        tokens = 3 + 4 - 1  # the model ran [5, 6, 7] and every generated token but the last
        tokens += len(complete(second.url, OPTION, observe_prompts(n=1, seed=11)[0]))
        after = wait_for_elements(second.url, tokens * D, OPTION, site="norm_in")
        assert sample(after, "normswap_activation_elements_total", model_name=OPTION, layer=1,
                      site="ffn_out") == tokens * D
        assert "vllm:" in metrics_text(second.url), "vLLM's own metrics must still be on the same endpoint"
    assert not marker.exists(), "pytorch_model.bin (pickle) was unpickled: only safetensors may be read"
    # vLLM 0.32 alone exits 0 here (vllm-project/vllm#48966); vllm_normswap.runtime.exit_code makes it 1
    assert code != 0, "API server exited 0 after its engine died: exit-code guard (runtime/exit_code.py) not installed by register()"


@pytest.mark.slow
def test_unwritable_prometheus_dir(checkpoints, tmp_path):
    not_a_dir = tmp_path / "prom-is-a-file"
    not_a_dir.write_text("")  # root ignores permission bits: a regular file is unwritable as a directory for anyone
    env = {**ENV, "PROMETHEUS_MULTIPROC_DIR": str(not_a_dir)}
    refused = server(checkpoints[OPTION], tmp_path / "prom.log", env).start()
    t0 = time.monotonic()
    try:
        while refused.proc.poll() is None:
            assert health(refused.url) != 200, "served with an unusable PROMETHEUS_MULTIPROC_DIR"
            assert time.monotonic() - t0 < 180, "still running"
            time.sleep(0.25)
    finally:
        refused.stop()
    log = refused.log_path.read_text(errors="replace")
    assert refused.proc.returncode != 0
    assert f"PROMETHEUS_MULTIPROC_DIR={str(not_a_dir)!r} is not a writable directory" in log, log[-3000:]


def test_no_remote_code_in_serving_configs():
    """The model, its config class and the int8 method come from this installed package: no config asks vLLM
    to run code from a checkpoint directory."""
    for path in sorted(SERVING_CONFIGS.glob("*.yaml")):
        settings = yaml.safe_load(path.read_text()) or {}
        assert not settings.get("trust-remote-code"), f"{path.name} sets trust-remote-code"
