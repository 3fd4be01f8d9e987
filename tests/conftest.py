"""Fixtures only; the helpers they are built from live in utils.py (re-exported here for tests/ab)."""

from __future__ import annotations

import os

import pytest

from utils import OPTION_VARIANTS, make_checkpoint, shared_tokenizer  # noqa: F401  (make_checkpoint: tests/ab)
from vllm_normswap.registry import OPTIONS

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """option -> checkpoint dir, one for every option of the registry, made once per test session (an option
    without an entry in utils.OPTION_VARIANTS gets the default settings)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {option: make_checkpoint(root / option, option) for option in OPTIONS}
