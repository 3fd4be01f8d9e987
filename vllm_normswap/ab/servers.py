"""One server run of the A/B: start vLLM for (option, precision, probe shift), measure, always stop.

The process handling (start, /health, stop, log) is ``vllm_normswap.runtime.server.VLLMServer``; this file decides the
command line: the option's serving config, the observer switched on when the config does not set it, a
max-model-len no larger than the checkpoint's position table, and the probe shift.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vllm_normswap.ab.auth import SERVER_ENV as SERVER_KEY_ENV
from vllm_normswap.registry import DEFAULT_THRESHOLDS
from vllm_normswap.serve import serving_config_path, server_argv
from vllm_normswap.runtime.server import VLLMServer

OBSERVER_DEFAULT = {"enabled": True, "thresholds": list(DEFAULT_THRESHOLDS)}


@dataclass
class ServerSpec:
    option: str
    model: str  # checkpoint dir
    precision: str = "bf16"  # bf16 | int8
    probe_shift: float = 0.0
    probe_layers: list[int] | None = None
    extra: list[str] = field(default_factory=list)  # further vLLM flags (--enforce-eager, -tp 2, ...)
    config: str | None = None  # serving config YAML (default serving_configs/OPTION.yaml)
    tag: str = ""  # tells apart two servers of one configuration (normswap ab --aa: "aa"), in names and logs

    @property
    def name(self) -> str:
        probe = f"-probe{self.probe_shift:g}" if self.probe_shift else ""
        return f"{self.option}-{self.precision}{probe}" + (f"-{self.tag}" if self.tag else "")


def build_argv(spec: ServerSpec, port: int) -> list[str]:
    config = Path(spec.config) if spec.config else serving_config_path(spec.option)
    settings = yaml.safe_load(config.read_text()) or {}
    overrides: dict = {}
    if "normswap_observe" not in (settings.get("hf-overrides") or {}):
        overrides["normswap_observe"] = OBSERVER_DEFAULT
    if spec.probe_shift:
        overrides["probe_shift"] = spec.probe_shift
        if spec.probe_layers is not None:
            overrides["probe_layers"] = list(spec.probe_layers)
    extra = list(spec.extra)
    ckpt_config = Path(spec.model) / "config.json"
    if "--max-model-len" not in extra and ckpt_config.is_file():
        positions = json.loads(ckpt_config.read_text()).get("max_position_embeddings")
        wanted = settings.get("max-model-len")
        if positions and (wanted is None or int(wanted) > int(positions)):
            extra += ["--max-model-len", str(positions)]  # the config's default would exceed the checkpoint
    return server_argv(spec.option, spec.model, port, int8=spec.precision == "int8", hf_overrides=overrides,
                       extra=extra, config=config)


class ServerRun:
    """``with ServerRun(spec, port, log_dir) as url:`` a healthy server; ``startup_s`` and ``log`` recorded.
    ``api_key``: the server's key, given to vLLM as VLLM_API_KEY in its environment (never on its command line,
    which the A/B records in results.json)."""

    def __init__(self, spec: ServerSpec, port: int, log_dir, startup_timeout: float = 600.0,
                 api_key: str | None = None):
        self.spec, self.log = spec, Path(log_dir) / f"{spec.name}.log"
        self.argv = build_argv(spec, port)
        self.api_key = api_key
        env = {SERVER_KEY_ENV: api_key} if api_key else None
        self.server = VLLMServer(self.argv, self.log, env=env, startup_timeout=startup_timeout)
        self.startup_s = None

    def start(self) -> "ServerRun":
        self._t = time.monotonic()
        self.server.start()
        return self

    def wait(self) -> str:
        """The URL once /health answers; ``startup_s`` counts from start() (polled every 0.5 s)."""
        try:
            self.server.wait_healthy()
        except BaseException:
            self.server.stop()
            raise
        self.startup_s = time.monotonic() - self._t
        return self.server.url

    @property
    def pid(self) -> int | None:
        return self.server.proc.pid if self.server.proc is not None else None

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> str:
        return self.start().wait()

    def __exit__(self, *exc):
        self.stop()


QUIET_CPU = 0.2  # cores: below this, a server's process tree counts as idle
QUIET_MAX_S = 5.0


def wait_quiet(pids: list[int], max_s: float = QUIET_MAX_S, window_s: float = 0.25) -> float:
    """Seconds spent waiting until the process trees of ``pids`` together use less than QUIET_CPU cores over a
    ``window_s`` window (at most ``max_s``). A vLLM CPU server keeps computing for up to about a second after its
    last request, and on a small box every server's worker is bound to the same core: the next server measured
    would lose that time. Measured on 2 cores: three requests sent right after a 2 s burst on the other server of
    the pair waited 0.6-1.0 s for their first token, against 20-60 ms after 3 s of quiet."""
    import psutil

    def tree() -> list[psutil.Process]:
        procs = []
        for pid in pids:
            try:
                root = psutil.Process(pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return procs

    t0 = time.monotonic()
    while time.monotonic() - t0 < max_s:
        procs = tree()
        for p in procs:
            try:
                p.cpu_percent(None)  # starts the window
            except psutil.NoSuchProcess:
                pass
        time.sleep(window_s)
        used = 0.0
        for p in procs:
            try:
                used += p.cpu_percent(None) / 100
            except psutil.NoSuchProcess:
                pass
        if used < QUIET_CPU:
            break
    return time.monotonic() - t0


def free_port() -> int:
    """A port nobody listens on now: vLLM's own helper. Imported here, not at the top, so that `normswap ab --help`
    and its argument errors do not wait for vLLM's import (seconds)."""
    from vllm.utils.network_utils import get_open_port

    return get_open_port()


def log_errors(log: Path, limit: int = 4) -> list[str]:
    """The exception lines of a server log ('XError: message'), first occurrences: the root cause comes first,
    vLLM's 'Engine core initialization failed' wrapper last."""
    if not log.is_file():
        return []
    found: list[str] = []
    for line in log.read_text(errors="replace").splitlines():
        m = None if " WARNING " in line else re.search(r"\b([A-Za-z_.]*(?:Error|Exception)): (.+)$", line)
        if m and m.group(0) not in found:
            found.append(m.group(0)[:400])
    return found[:limit]
