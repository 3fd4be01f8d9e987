"""Bad checkpoints and serving configs stop the server before it serves, with a message naming the problem and
the fix (at the least: a bad norm_type, a missing tensor, a tensor of the wrong shape).

- offline: the pre-flight validator (model/checkpoint_format.py) and NormSwapArch on each case, no vLLM;
- server: one real vLLM start per case (eager): the process must exit non-zero, /health must never answer 200,
  and the log must hold the message. Set NORMSWAP_MESSAGES_OUT=FILE to collect the messages (the table in docs/troubleshooting.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from bad_checkpoints import BY_NAME, CASES, OPTION, Case
from vllm_normswap.checkpoints.files import load_config
from vllm_normswap.model.checkpoint_format import CheckpointError, check_values, preflight
from vllm_normswap.model.config import NormSwapArch
from vllm_normswap.registry import ConfigError
from utils import RemoteOpenAIServer, health

EXIT_TIMEOUT_S = 180  # generous for a loaded 2-core box; a failing start takes ~15-25 s


def offline_check(model_dir, expect_option=None) -> None:
    """What the model does at load, without vLLM: config validation, then the pre-flight, then every value."""
    from safetensors.torch import load_file

    cfg = load_config(model_dir) if model_dir.is_dir() else {}
    arch = NormSwapArch.from_dict({**cfg, "expect_option": expect_option}) if cfg else None
    preflight(model_dir, arch, cfg)
    for f in sorted(model_dir.glob("*.safetensors")):
        for name, tensor in load_file(str(f)).items():
            check_values(name, tensor)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_offline_names_problem_and_fix(case: Case, checkpoints, tmp_path):
    model = case.make(checkpoints[OPTION], tmp_path)
    with pytest.raises(ConfigError) as err:
        offline_check(model, expect_option=case.serve_option)
    for words in case.expect:
        assert words in str(err.value), f"{case.name}: {words!r} not in message:\n{err.value}"


def test_offline_good_checkpoints_pass(checkpoints, tmp_path):
    from vllm_normswap.checkpoints.quantize import quantize_checkpoint

    for option, model in checkpoints.items():
        offline_check(model, expect_option=option)
    quantize_checkpoint(checkpoints["rms-swiglu"], tmp_path / "int8", "group", 64)
    offline_check(tmp_path / "int8", expect_option="rms-swiglu")


def test_offline_int8_wrong_granularity(checkpoints, tmp_path):
    """Scales written per group while config.json says per channel: the layout check names the tensor."""
    from vllm_normswap.checkpoints.quantize import quantize_checkpoint

    dst = quantize_checkpoint(checkpoints[OPTION], tmp_path / "int8", "group", 64) and tmp_path / "int8"
    cfg = load_config(dst)
    weights = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    weights.update(strategy="channel", group_size=None)
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"weight_scale \[\d+, 2\].*normswap quantize"):
        offline_check(dst)


# One server start per case costs ~20 s (up to ~60 s on a busy box). CI runs the four that cover each code path
# (config validation, the pre-flight before any weight is read, the per-tensor value check; a bad norm_type, a
# missing tensor and a wrong shape among them); the others take the same paths and are `slow`: the offline tests
# above check their messages on every run.
FAST = {"bad_norm_type", "missing_tensor", "misshapen_tensor", "nan_weights"}
SERVED = [c for c in CASES if c.name != "missing_dir"]  # a missing dir never reaches vLLM: see test_cli_* below


@pytest.mark.server
@pytest.mark.parametrize("case", [c if c.name in FAST else pytest.param(c, marks=pytest.mark.slow)
                                  for c in SERVED], ids=[c.name for c in SERVED])
def test_server_refuses(case: Case, checkpoints, tmp_path):
    model = case.make(checkpoints[OPTION], tmp_path)
    server = RemoteOpenAIServer(case.serve_option, model, tmp_path / "server.log",
                                extra=["--enforce-eager", "--max-model-len", "256", *case.extra_argv])
    assert "--trust-remote-code" not in server.argv  # our config class is registered; no remote code is ever run
    server.start()
    t0 = time.monotonic()
    try:
        while server.proc.poll() is None:
            assert health(server.url, timeout=1) != 200, f"{case.name}: the server came up and serves:\n{server.log_tail()}"
            assert time.monotonic() - t0 < EXIT_TIMEOUT_S, f"{case.name}: still running after {EXIT_TIMEOUT_S}s"
            time.sleep(0.25)
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    assert server.proc.returncode != 0, f"{case.name}: exit code 0\n{log[-3000:]}"
    missing = [words for words in case.expect if words not in log]
    assert not missing, f"{case.name}: log lacks {missing}:\n{log[-4000:]}"
    message = _message_line(log, case.expect[0])
    if os.environ.get("NORMSWAP_MESSAGES_OUT"):
        with open(os.environ["NORMSWAP_MESSAGES_OUT"], "a") as f:
            f.write(json.dumps({"case": case.name, "what": case.what, "exit": server.proc.returncode,
                                "seconds": round(time.monotonic() - t0, 1), "message": message}) + "\n")


def test_cli_missing_checkpoint_dir(tmp_path):
    """`normswap serve --model DIR` with a DIR that does not exist stops before vLLM starts (vLLM itself would
    read the path as a hub repo id and say "Repo id must be in the form ..."). --print-command: no server."""
    missing = tmp_path / "no-such-ckpt"
    proc = subprocess.run([sys.executable, "-m", "vllm_normswap.cli", "serve", OPTION, "--model", str(missing),
                           "--print-command"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, f"printed a server command for a missing checkpoint:\n{proc.stdout}"
    for words in BY_NAME["missing_dir"].expect:
        assert words in proc.stderr, proc.stderr[-2000:]


def test_cli_missing_zoo(monkeypatch, tmp_path):
    """`normswap serve OPTION` without --model and without the embedded zoo: exit with the build command."""
    from vllm_normswap.checkpoints import zoo
    from vllm_normswap.serve import default_model

    monkeypatch.setattr(zoo, "option_dir", lambda option: tmp_path / "zoo" / option)
    with pytest.raises(SystemExit) as err:
        default_model(OPTION)
    assert "zoo" in str(err.value) and "normswap zoo build" in str(err.value) and "--model" in str(err.value)


def _message_line(log: str, words: str) -> str:
    """The exception line that carries the message (the last one: vLLM re-raises in the API server)."""
    lines = [re.sub(r"^\(\w+ pid=\d+\)\s*", "", line) for line in log.splitlines() if words in line]
    return lines[-1].strip() if lines else ""
