"""Shared fixtures: tiny random NormSwap checkpoints, a vLLM offline runner in a subprocess, free ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# A spread of architecture settings across the four options, so that each setting is exercised somewhere.
OPTION_VARIANTS = {
    "ln-gelu": dict(position_embedding_type="learned", norm_eps_placement="outside_sqrt"),
    "ln-swiglu": dict(position_embedding_type="rope", norm_eps_placement="inside_sqrt", kv_heads=1,
                      tie_word_embeddings=False),
    "rms-gelu": dict(position_embedding_type="rope", norm_eps_placement="outside_sqrt", mlp_bias=False),
    "rms-swiglu": dict(position_embedding_type="learned", norm_eps_placement="outside_sqrt", attention_bias=False),
}


def make_checkpoint(dst: Path, option: str, seed: int = 0, **overrides) -> Path:
    """A small random checkpoint (head_dim 64: vLLM's CPU attention rejects 16) with non-zero biases and norm
    affine parameters, so that every tensor matters."""
    from vllm_normswap.checkpoints.random_init import make_arch, write_random_checkpoint

    variant = {**OPTION_VARIANTS[option], **overrides}
    # initializer_range 0.1 (not 0.02): peaked next-token distributions, so greedy decisions have real margins
    arch = make_arch(option, hidden_size=128, layers=2, heads=2, vocab_size=512, initializer_range=0.1, **variant)
    return write_random_checkpoint(dst, arch, seed=seed, bias_std=0.05, tokenizer=shared_tokenizer())


_TOKENIZER = None


def shared_tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from vllm_normswap.checkpoints.tokenizer import stdlib_sample, train_bpe

        _TOKENIZER = train_bpe(stdlib_sample(200_000), 512)
    return _TOKENIZER


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """option -> checkpoint dir, made once per test session."""
    root = tmp_path_factory.mktemp("ckpt")
    return {option: make_checkpoint(root / option, option) for option in OPTION_VARIANTS}


def run_vllm_offline(spec: dict, timeout: float = 600, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, str(TESTS / "vllm_offline.py"), json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"vLLM run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT_JSON ")]
    assert lines, f"vLLM run printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return json.loads(lines[-1].removeprefix("RESULT_JSON "))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
