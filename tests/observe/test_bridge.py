"""The observer's series reach vLLM's /metrics in every multiprocess setup: no PROMETHEUS_MULTIPROC_DIR
(test_exactness), an operator-set one and a restart over that same (stale) directory (the engine-kill test in
tests/robustness/test_faults.py, which restarts anyway), and --api-server-count 2 (here).
"""

from __future__ import annotations

import sys

import pytest

from observe_helpers import complete, observe_overrides, observe_prompts, sample, wait_for_elements
from utils import VLLM_CLI, RemoteOpenAIServer, metrics_text, server_argv
from vllm_normswap.serve import ENTRYPOINT

pytestmark = pytest.mark.server
OPTION = "ln-gelu"
D = 128


EXTRA = ["--enforce-eager", "--max-model-len", "512"]


def elements(metrics, layer=0, site="norm_in"):
    return sample(metrics, "normswap_activation_elements_total", model_name=OPTION, layer=layer, site=site)


def test_two_api_servers(checkpoints, tmp_path):
    ckpt = checkpoints[OPTION]

    def argv(port):
        # vLLM implements --api-server-count only in `vllm serve`; same flags, through the CLI shim
        cmd = server_argv(OPTION, str(ckpt), port, hf_overrides=observe_overrides(),
                          extra=[*EXTRA, "--api-server-count", "2"])
        rest = cmd[cmd.index(ENTRYPOINT) + 1:]
        m = rest.index("--model")
        model = rest[m + 1]
        del rest[m:m + 2]
        return [sys.executable, str(VLLM_CLI), "serve", model, *rest]

    with RemoteOpenAIServer(OPTION, argv=argv, log_path=tmp_path / "two.log") as server:
        tokens = sum(len(complete(server.url, OPTION, p)) for p in observe_prompts(n=4, seed=12))
        # requests and scrapes are spread over both API servers; every scrape must show the full totals
        for _ in range(4):
            metrics = wait_for_elements(server.url, tokens * D, OPTION, site="norm_in")
            assert elements(metrics, layer=1, site="act_out") == tokens * 4 * D  # GELU width 4d
        assert "vllm:" in metrics_text(server.url)
