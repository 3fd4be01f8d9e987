"""`normswap ab`'s argument surface (vllm_normswap/ab/arguments.py): a bad value or combination exits 2 before any
run folder exists, with a message that names the flag and the fix; and how the servers will start. No server."""

import argparse

import pytest

from ab_helpers import run_ab
from vllm_normswap.ab import arguments, run as ab_run
from vllm_normswap.runtime import forkserver


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="normswap ab")
    arguments.add_arguments(p)
    return p.parse_args(argv)


def test_rounds_0_is_an_argument_error_naming_the_fix(tmp_path):
    """It used to start the servers and crash on a missing latency.csv."""
    proc, summary = run_ab(["--rounds", "0", "--out", str(tmp_path / "runs")], timeout=120)
    assert proc.returncode == 2 and summary is None
    assert "argument --rounds: must be at least 1 (got 0)" in proc.stderr and "--rounds 2 or more" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv,message", [
    (["--rounds", "-1"], "argument --rounds: must be at least 1 (got -1)"),
    (["--max-tokens", "1"], "argument --max-tokens: must be at least 2 (got 1): TPOT is"),
    (["--docs", "0"], "argument --docs: must be at least 1 (got 0)"),
    (["--users", "two"], "argument --users: 'two': expected a whole number >= 1"),
    (["--load-seconds", "0"], "argument --load-seconds: must be > 0 seconds (got 0)"),
    (["--probe-layers", "0,x"], "argument --probe-layers: '0,x': expected a comma list of layer indices"),
    (["--server-start", "spawn"], "argument --server-start: invalid choice: 'spawn'"),
])
def test_a_bad_value_names_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_defaults_parse():
    args = _parse([])
    assert (args.rounds, args.docs, args.probe_layers, args.server_start) == (6, 64, [], "fork")


@pytest.mark.parametrize("argv,message", [
    (["--aa", "--endpoint", "ln-gelu-bf16=http://127.0.0.1:1"], "cannot be combined with --endpoint"),
    (["--aa", "--precisions", "bf16"], "--precisions does not apply (drop it)"),
    (["--option", "ln-gleu=/nowhere"], "--option ln-gleu=...: unknown option id; choose from"),
    (["--option", "ln-gelu=/nowhere"], "no config.json there"),
    (["--endpoint", "ln-gelu-fp8=http://127.0.0.1:1"], "NAME must be OPTION-PRECISION"),
    (["--endpoint", "ln-gelu-bf16=127.0.0.1:1"], "the URL must start with http:// or https://"),
    (["--options", "ln-gelu", "--probe-options", "rms-gelu"], "(the options this run measures), or 'auto' or 'all'"),
])
def test_a_bad_combination_exits_2_naming_the_fix(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        ab_run.targets(_parse(argv), [])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_server_start_fork_unless_the_user_chose_otherwise():
    fork_engine = ab_run.FORK_ENGINE_ENV
    assert ab_run.server_start_env("fork", {}, gpu=False) == {forkserver.ENV: "1", fork_engine: "1"}
    # a variable set by the user wins (the interrupt test runs `normswap ab` with NORMSWAP_FORKSERVER=0)
    assert ab_run.server_start_env("fork", {forkserver.ENV: "0"}, gpu=False) == {forkserver.ENV: "0",
                                                                                 fork_engine: "1"}
    assert ab_run.server_start_env("fresh", {forkserver.ENV: "1"}, gpu=False) == {forkserver.ENV: "0",
                                                                                  fork_engine: "0"}
    assert ab_run.server_start_env("fork", {}, gpu=True) == {}  # vLLM's own start on a GPU
