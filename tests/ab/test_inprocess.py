"""The A/B's in-process tail (vllm_normswap/ab/inprocess.py) gives the same numbers in worker processes, options side
by side, as one option after the other in this process: each option is one thread either way. No server."""

import pytest

from utils import make_checkpoint
from vllm_normswap.ab.inprocess import Settings, run_all


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("inprocess")
    return {o: str(make_checkpoint(root / o, o)) for o in ("ln-gelu", "rms-swiglu")}


def test_workers_give_the_numbers_computed_here(ckpts):
    docs = [[1 + (37 * i + 11 * j) % 500 for j in range(48)] for i in range(3)]
    s = Settings(top_k=5, probe_grid=(0.0, 4.0), probe_layers=None, attribution=True, attribution_docs=2,
                 attribution_layers=None)
    here, pooled = run_all(ckpts, docs, s, n_workers=1), run_all(ckpts, docs, s, n_workers=2)
    for option in ckpts:
        a, b = here[option], pooled[option]
        assert a.floor_error is None and b.floor_error is None
        assert len(a.scores) == len(docs) and b.scores == a.scores  # same fp32 forward, one thread: bit for bit
        assert [p["c"] for p in a.curve] == [0.0, 4.0] and b.curve == a.curve
        assert a.attribution["cost"]["documents"] == 2
        for key in ("linears", "total", "act_out"):
            assert b.attribution[key] == a.attribution[key], key
        assert set(b.seconds) == {"quality", "probe", "attribution"} and b.seconds["attribution"] > 0


def test_a_checkpoint_the_reference_cannot_load_is_an_error_of_that_option(ckpts, tmp_path):
    broken = dict(ckpts, **{"rms-gelu": str(tmp_path / "nothing")})
    s = Settings(top_k=5, probe_grid=(0.0,), probe_layers=None, attribution=False, attribution_docs=0,
                 attribution_layers=None)
    out = run_all(broken, [[1, 2, 3, 4]], s, n_workers=2)
    assert out["rms-gelu"].floor_error and "error" in out["rms-gelu"].curve and out["rms-gelu"].attribution is None
    assert out["ln-gelu"].floor_error is None and out["ln-gelu"].scores
