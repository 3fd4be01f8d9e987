"""The A/B's keys, redaction and run folders as pure logic (no server): which variable a key comes from, that
nothing written carries a secret, that run folders never collide, that results.json round-trips for --report,
and that SIGTERM becomes a catchable interrupt. The real-server checks are in test_ab_run.py (a keyed fleet) and
test_ab_interrupt.py (Ctrl-C mid-load)."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vllm_normswap.ab import auth, metrics, record
from vllm_normswap.serve import ENTRYPOINT, server_argv

KEY = "sk-test-0123456789abcdef"


def test_key_from_env_prefers_the_endpoint_variable():
    env = {"NORMSWAP_API_KEY_LN_GELU_INT8": "one", "NORMSWAP_API_KEY": "all", "OPENAI_API_KEY": "openai"}
    assert auth.key_from_env("ln-gelu-int8", env) == ("one", "NORMSWAP_API_KEY_LN_GELU_INT8")
    assert auth.key_from_env("ln-gelu-bf16", env) == ("all", "NORMSWAP_API_KEY")
    assert auth.key_from_env("ln-gelu-bf16", {"OPENAI_API_KEY": "o"}) == ("o", "OPENAI_API_KEY")
    key, var = auth.key_from_env("rms-gelu-bf16", {})
    assert key is None and "NORMSWAP_API_KEY_RMS_GELU_BF16" in var


def test_headers_by_url():
    auth.register("http://h:1/", KEY, "NORMSWAP_API_KEY")
    assert auth.headers("http://h:1") == {"Authorization": f"Bearer {KEY}"}
    assert auth.headers("http://other:2") == {}
    assert auth.argv_key(["--port", "1", "--api-key", "s1"]) == "s1"
    assert auth.argv_key(["--api-key=s2"]) == "s2" and auth.argv_key(["--port", "1"]) is None


@pytest.mark.parametrize("argv", [["--api-key", KEY], [f"--api-key={KEY}"], ["--api_key", KEY]])
def test_redaction_of_argv_text_and_structures(argv):
    assert KEY not in " ".join(auth.redact_argv(["python", "-m", "x", *argv, "--port", "1"]))
    assert auth.redact_argv(["--port", "1"]) == ["--port", "1"]
    assert KEY not in auth.redact_text(f"non-default args: {' '.join(argv)} and Authorization: Bearer {KEY}")
    doc = {"args": {"passthrough": argv}, "runs": [{"command": ["python", *argv], "error": f"x {' '.join(argv)}"}]}
    assert KEY not in json.dumps(auth.redact(doc))


def test_redaction_of_any_key_in_use(tmp_path):
    auth.register("http://h:3", KEY, "NORMSWAP_API_KEY")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "server.log").write_text(f"api_key={KEY!r} and again {KEY}\n")
    (tmp_path / "clean.log").write_text("nothing\n")
    assert record.scrub(tmp_path) == [tmp_path / "sub" / "server.log"]
    assert KEY not in (tmp_path / "sub" / "server.log").read_text()
    record.save(tmp_path, {"meta": {"args": {"x": KEY}}, "runs": []})
    assert KEY not in (tmp_path / "results.json").read_text()


def test_run_folders_never_collide(tmp_path):
    dirs = [record.new_run_dir(tmp_path) for _ in range(3)]  # within one second
    assert len(set(dirs)) == 3 and all(d.is_dir() for d in dirs)


def test_results_round_trip_the_observer_keys(tmp_path):
    text = "\n".join([
        '# TYPE normswap_activation_outliers_total counter',
        'normswap_activation_outliers_total{model_name="m",layer="0",site="act_out",threshold="6.0"} 3',
        '# TYPE normswap_activation_elements_total counter',
        'normswap_activation_elements_total{model_name="m",layer="0",site="act_out"} 100',
        '# TYPE normswap_activation_absmax gauge',
        'normswap_activation_absmax{model_name="m",layer="0",site="act_out"} 7.5', ''])
    parsed = metrics.parse(text)
    record.save(tmp_path, {"meta": {}, "runs": [{"name": "a", "observer": parsed}]})
    back = record.load(tmp_path)["runs"][0]["observer"]
    assert back["outliers"] == {(0, "act_out", 6.0): 3.0} and back["elements"] == {(0, "act_out"): 100.0}
    assert metrics.outlier_rates(back, "act_out", 6.0) == {0: 0.03}


def test_results_are_replaced_atomically(tmp_path):
    record.save(tmp_path, {"meta": {"n": 1}, "runs": []})
    record.save(tmp_path, {"meta": {"n": 2}, "runs": []})
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["n"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_sigterm_becomes_an_interrupt_and_a_second_one_is_ignored():
    code = textwrap.dedent("""
        import os, signal, sys, time
        from vllm_normswap.ab import record
        with record.interruptible():
            try:
                print("ready", flush=True)
                time.sleep(30)
            except KeyboardInterrupt as e:
                os.kill(os.getpid(), signal.SIGINT)  # a second signal while stopping: noted, ignored
                time.sleep(0.2)
                print("caught", e.signame, flush=True)
                sys.exit(record.EXIT_INTERRUPTED)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "caught SIGTERM" in out and "SIGINT again" in err


def test_server_command_line_has_each_flag_once():
    argv = server_argv("ln-gelu", "/m", 8000, int8=True, extra=["--max-logprobs", "5", "--enforce-eager"])
    assert argv[1:3] == ["-m", ENTRYPOINT] and "--config" not in argv
    flags = [a for a in argv if a.startswith("--")]
    assert len(flags) == len(set(flags))  # vLLM warns "Found duplicate keys" otherwise
    assert argv[argv.index("--max-logprobs") + 1] == "5"  # the passed-through flag wins over the YAML
    assert argv[argv.index("--served-model-name") + 1] == "ln-gelu-int8"
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    assert overrides["expect_option"] == "ln-gelu" and overrides["normswap_observe"]["enabled"] is True
