"""The test fixtures cover the registry: every option has a test checkpoint of its own option (a new option
that the fixtures skipped would otherwise go untested without a word)."""

from __future__ import annotations

from utils import OPTION_VARIANTS
from vllm_normswap.checkpoints.files import load_arch
from vllm_normswap.registry import OPTIONS


def test_every_registry_option_has_a_checkpoint(checkpoints):
    missing = [option for option in OPTIONS if option not in checkpoints]
    assert not missing, f"registry options without a test checkpoint in the `checkpoints` fixture: {missing}"
    for option, ckpt in checkpoints.items():
        arch = load_arch(ckpt)
        assert (arch.option, arch.norm_type, arch.ffn_act) == (option, OPTIONS[option].norm_type,
                                                             OPTIONS[option].ffn_act), option


def test_variants_name_only_registry_options():
    stale = sorted(set(OPTION_VARIANTS) - set(OPTIONS))
    assert not stale, f"tests/utils.py OPTION_VARIANTS lists options the registry does not have: {stale}"
