"""The documented server command, `normswap serve OPTION --model DIR`, for every option, through the `openai`
client: completions, streaming completions and echo logprobs.

Checks with an independent truth: echoed prompt logprobs equal the pure-torch reference's within the parity
tolerance (tests/model/test_vllm_parity.py), the greedy completion's tokens are the reference's argmax wherever its
top-2 margin is clear, and the streamed text is the same as the non-streamed text.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from utils import RemoteOpenAIServer, ServerPairs, port_holders, random_prompts, server_processes
from vllm_normswap.runtime.engine_fork import ENV as FORK_ENV, FORK_LOG
from vllm_normswap.checkpoints.files import load_reference
from vllm_normswap.registry import OPTIONS

pytestmark = pytest.mark.server

LOGPROB_ATOL, LOGPROB_MEAN_ATOL, MARGIN = 0.1, 0.02, 0.05  # as in the parity test (bf16 server vs fp32 reference)
NORMSWAP = shutil.which("normswap", path=str(Path(sys.executable).parent)) or "normswap"


@pytest.fixture(scope="module")
def servers(checkpoints, tmp_path_factory):
    """`normswap serve OPTION` for every option, started two at a time (utils.ServerPairs)."""
    logs = tmp_path_factory.mktemp("serve")

    def server(option):
        def argv(port):
            return [NORMSWAP, "serve", option, "--model", str(checkpoints[option]), "--port", str(port),
                    "--", "--enforce-eager", "--max-model-len", "256"]
        return RemoteOpenAIServer(option, argv=argv, log_path=logs / f"{option}.log", startup_timeout=300)

    with ServerPairs.for_options(server) as pairs:
        yield pairs


@pytest.fixture(scope="module", params=list(OPTIONS))
def served(request, checkpoints, servers):
    option = request.param
    return option, checkpoints[option], servers[option].get_client()


def prompt_ids(seed: int, n: int = 24) -> list[int]:
    return random_prompts(1, seed, lengths=n)[0]


def test_models_lists_the_option(served):
    option, _, client = served
    assert [m.id for m in client.models.list().data] == [option]


def test_forked_engine_leaves_the_port_to_the_api_server(served, servers):
    """The suite's servers fork EngineCore and the worker (NORMSWAP_FORK_ENGINE=1, tests/conftest.py): the log
    says so, both processes exist, and neither holds the API server's port (the at-fork hook closed it; without
    it they keep it bound). The default start, spawn, is checked by tests/test_wheel.py."""
    option = served[0]
    server = servers[option]
    assert os.environ.get(FORK_ENV) == "1"
    assert FORK_LOG in server.log_tail(500_000)
    names = [p.name() for p in server_processes(server)]
    assert "VLLM::EngineCore" in names and "VLLM::Worker" in names, names
    holders = port_holders(server)
    assert len(holders) == 1 and not holders[0].startswith("VLLM::"), holders


def test_echo_logprobs_match_reference(served):
    option, ckpt, client = served
    ids = prompt_ids(1)
    r = client.completions.create(model=option, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs.token_logprobs
    assert lp[0] is None and len(lp) == len(ids) + 1  # no logprob for the first prompt token; one generated
    want = torch.tensor(load_reference(ckpt).prompt_logprobs(ids))
    diff = (torch.tensor(lp[1:len(ids)]) - want).abs()
    print(f"{option}: echo logprobs max |diff| {diff.max():.4f}, mean {diff.mean():.4f}")
    assert diff.max() < LOGPROB_ATOL and diff.mean() < LOGPROB_MEAN_ATOL


def test_greedy_completion_matches_reference(served):
    option, ckpt, client = served
    ids = prompt_ids(2)
    r = client.completions.create(model=option, prompt=ids, max_tokens=16, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    choice = r.choices[0]
    got = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
    assert len(got) == 16 and r.usage.completion_tokens == 16 and r.usage.prompt_tokens == len(ids)
    logits = load_reference(ckpt).forward(torch.tensor(ids + got))[len(ids) - 1:-1]
    top = logits.topk(2, dim=-1)
    margins = (top.values[:, 0] - top.values[:, 1]).tolist()
    checked = [(g, w) for g, w, m in zip(got, top.indices[:, 0].tolist(), margins) if m > MARGIN]
    assert len(checked) >= len(got) // 2 and all(g == w for g, w in checked), (got, checked)


def test_streaming_equals_non_streaming(served):
    option, _, client = served
    ids = prompt_ids(3)
    kw = dict(model=option, prompt=ids, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert len(chunks) > 1  # really streamed, not one blob
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason == "length" or any(
        c.choices and c.choices[0].finish_reason == "length" for c in chunks)
