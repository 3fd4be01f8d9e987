"""One short `normswap ab` run on two tiny random checkpoints, shared by the tests that read its folder."""

import json
from pathlib import Path

import pytest

from ab_helpers import AB_ARGS, AB_OPTIONS, PASSTHROUGH_KEY, run_ab
from utils import make_checkpoint


@pytest.fixture(scope="session")
def ab(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab")
    ckpts = {o: make_checkpoint(root / o, o) for o in AB_OPTIONS}
    argv = AB_ARGS + ["--out", str(root / "runs")]
    for o, path in ckpts.items():
        argv += ["--option", f"{o}={path}"]
    proc, summary = run_ab(argv + ["--", "--api-key", PASSTHROUGH_KEY])
    assert proc.returncode == 0 and summary, proc.stderr[-4000:]
    results = json.loads(Path(summary["results"]).read_text())
    return ckpts, results, Path(summary["run_dir"]), summary
