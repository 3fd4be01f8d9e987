"""Running `normswap ab` from tests: the short configuration the A/B tests share."""

import json
import os
import subprocess
import sys
from pathlib import Path


AB_OPTIONS = ("ln-gelu", "rms-gelu")  # one LayerNorm and one RMSNorm option: the probe's two servers
# small but complete: warm-up, three alternating load rounds per server, the probe, the fp32 floor
AB_ARGS = ["--docs", "4", "--doc-tokens", "96", "--prompts", "8", "--users", "2", "--max-tokens", "4",
           "--load-seconds", "9", "--rounds", "3", "--min-requests", "8", "--warmup-max-s", "30",
           "--probe-shifts", "4", "--probe-grid", "0,2,4"]


# The shared run passes this key to its servers after -- (vLLM logs it among its "non-default args"): every file
# of the run folder is then checked for it (test_ab_run.py), which exercises the redaction on a real run.
PASSTHROUGH_KEY = "sk-passthrough-7f3a9c1e5b"


def ab_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "vllm_normswap.cli", "ab", *argv]


def run_ab(argv: list[str], timeout: float = 1500, env: dict | None = None
           ) -> tuple[subprocess.CompletedProcess, dict | None]:
    """`normswap ab ARGV`; ``env``: variables added to this process's environment (API keys)."""
    proc = subprocess.run(ab_command(argv), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    lines = proc.stdout.strip().splitlines()
    return proc, json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
