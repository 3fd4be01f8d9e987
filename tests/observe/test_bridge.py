"""The observer's series reach vLLM's /metrics in every multiprocess setup: no PROMETHEUS_MULTIPROC_DIR
(test_exactness), an operator-set one, a restart over that same (stale) directory, and --api-server-count 2.

The first server fills the operator's directory; the restarted one must start from zero (our stale files are
removed at start-up) and then count exactly the new tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from observe_helpers import complete, observe_overrides, observe_prompts, sample, scrape, wait_for_elements
from utils import RemoteOpenAIServer, metrics_text, server_argv

pytestmark = pytest.mark.server
OPTION = "ln-gelu"
D = 128


EXTRA = ["--enforce-eager", "--max-model-len", "512"]


def server(ckpt, log, env):
    return RemoteOpenAIServer(OPTION, ckpt, log, hf_overrides=observe_overrides(), extra=EXTRA, env=env)


def elements(metrics, layer=0, site="norm_in"):
    return sample(metrics, "normswap_activation_elements_total", model_name=OPTION, layer=layer, site=site)


def test_operator_dir_and_restart_with_stale_dir(checkpoints, tmp_path):
    operator_dir = tmp_path / "prom"
    operator_dir.mkdir()
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "PROMETHEUS_MULTIPROC_DIR": str(operator_dir)}
    ckpt = checkpoints[OPTION]
    first_prompts, second_prompts = observe_prompts(n=3, seed=10), observe_prompts(n=1, seed=11)
    with server(ckpt, tmp_path / "first.log", env) as first:
        tokens = sum(len(complete(first.url, OPTION, p)) for p in first_prompts)
        metrics = wait_for_elements(first.url, tokens * D, OPTION, site="norm_in")
        assert elements(metrics, layer=1, site="ffn_out") == tokens * D
    assert list(operator_dir.glob("*_normswap-*.db")), "the first run should have left its files behind"

    with server(ckpt, tmp_path / "second.log", env) as second:
        before = scrape(second.url)
        assert elements(before) in (None, 0.0), f"restart shows the previous run's count {elements(before)}"
        stale = [k for k, v in before.items() if k[0].endswith("_total") and v]
        assert not stale, f"restart shows old values: {stale[:3]}"
        new_tokens = len(complete(second.url, OPTION, second_prompts[0]))
        after = wait_for_elements(second.url, new_tokens * D, OPTION, site="norm_in")
        assert elements(after, layer=1, site="ffn_out") == new_tokens * D
        vllm_text = metrics_text(second.url)
        assert "vllm:" in vllm_text, "vLLM's own metrics must still be on the same endpoint"


def test_two_api_servers(checkpoints, tmp_path):
    ckpt = checkpoints[OPTION]

    def argv(port):
        # vLLM implements --api-server-count only in `vllm serve`; same flags, through the CLI shim
        cmd = server_argv(OPTION, str(ckpt), port, hf_overrides=observe_overrides(),
                          extra=[*EXTRA, "--api-server-count", "2"])
        rest = cmd[cmd.index("vllm.entrypoints.openai.api_server") + 1:]
        m = rest.index("--model")
        model = rest[m + 1]
        del rest[m:m + 2]
        return [sys.executable, str(Path(__file__).with_name("vllm_serve_cli.py")), model, *rest]

    with RemoteOpenAIServer(OPTION, argv=argv, log_path=tmp_path / "two.log") as server:
        tokens = sum(len(complete(server.url, OPTION, p)) for p in observe_prompts(n=4, seed=12))
        # requests and scrapes are spread over both API servers; every scrape must show the full totals
        for _ in range(4):
            metrics = wait_for_elements(server.url, tokens * D, OPTION, site="norm_in")
            assert elements(metrics, layer=1, site="act_out") == tokens * 4 * D  # GELU width 4d
        assert "vllm:" in metrics_text(server.url)
