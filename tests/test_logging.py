"""Logs where vLLM's logs go: the plugin's loggers sit under vLLM's "vllm" logger (vllm_normswap.logs), so once
vLLM configures its logging (as every engine and server process does) their INFO lines come out through vLLM's
handler, in vLLM's format; CLI commands keep stdout for their JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

PLUGIN_MODULES = ("vllm_normswap.observe.publisher", "vllm_normswap.quant.linear_method",
                  "vllm_normswap.runtime.exit_code")


def _python(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOGGING")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_plugin_loggers_are_under_vllms():
    import logging

    from vllm_normswap.logs import PREFIX, plugin_logger

    log = plugin_logger("vllm_normswap.observe.publisher")
    assert log.name == PREFIX + "vllm_normswap.observe.publisher"
    logging.getLogger("vllm")  # vLLM's dictConfig creates it in a server; until then it is a placeholder
    parents, lg = [], log
    while lg is not None:
        parents.append(lg.name)
        lg = lg.parent
    assert "vllm" in parents and parents.index("vllm") < parents.index("root")
    assert hasattr(log, "info_once") and hasattr(log, "warning_once")  # vLLM's init_logger was used
    for name in PLUGIN_MODULES:
        import importlib

        mod = importlib.import_module(name)
        loggers = [v for v in vars(mod).values() if isinstance(v, logging.Logger)]
        assert loggers and all(lg.name.startswith("vllm.") for lg in loggers), (name, [lg.name for lg in loggers])


def test_plugin_info_lines_go_through_vllms_handler():
    """As in a server process: vLLM configures its logging, then a plugin module logs at INFO."""
    r = _python(f"""
        import importlib
        from vllm.config.logging import LoggingConfig
        from vllm.logger import configure_logging, current_formatter_type
        configure_logging(LoggingConfig())
        for name in {PLUGIN_MODULES!r}:
            mod = importlib.import_module(name)
            log = getattr(mod, "log", None) or getattr(mod, "logger")
            assert current_formatter_type(log) is not None, name  # finds vLLM's handler named "vllm"
            log.info("normswap-test-line from %s", name)
        """)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in PLUGIN_MODULES:
        lines = [ln for ln in r.stdout.splitlines() if f"normswap-test-line from {name}" in ln]
        assert len(lines) == 1, (name, r.stdout[-3000:], r.stderr[-3000:])
        # vLLM's own format: "(<process> pid=N) INFO <date> [file:line] message"
        assert " INFO " in lines[0] and "pid=" in lines[0], lines[0]


def test_plugin_info_lines_follow_vllm_logging_stream_and_level():
    r = _python("""
        from vllm.config.logging import LoggingConfig
        from vllm.logger import configure_logging
        configure_logging(LoggingConfig())
        from vllm_normswap.observe.publisher import log
        log.info("normswap-info-line")
        log.warning("normswap-warning-line")
        """, {"VLLM_LOGGING_STREAM": "ext://sys.stderr", "VLLM_LOGGING_LEVEL": "WARNING"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "normswap-warning-line" in r.stderr and "WARNING" in r.stderr
    assert "normswap-info-line" not in r.stderr + r.stdout
    assert "normswap-warning-line" not in r.stdout


def test_params_stdout_is_json_even_with_a_warning():
    """A warning raised while `normswap params` runs -- through vLLM's configured logging (stdout by default in
    vLLM), through Python's warnings and through a plugin logger -- goes to stderr; stdout stays one JSON doc."""
    r = _python("""
        import sys, warnings
        from vllm_normswap import cli
        import vllm_normswap.checkpoints.params as params
        run = params.run
        def noisy_run(args):
            from vllm.config.logging import LoggingConfig
            from vllm.logger import configure_logging, init_logger
            configure_logging(LoggingConfig())  # as an engine started inside a command would
            from vllm_normswap.logs import plugin_logger
            plugin_logger("vllm_normswap.checkpoints.params").warning("normswap-test-warning plugin")
            init_logger("vllm.config").warning("normswap-test-warning vllm")
            warnings.warn("normswap-test-warning python")
            return run(args)
        params.run = noisy_run
        sys.exit(cli.main(["params"]))
        """)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert "options" in doc
    for what in ("plugin", "vllm", "python"):
        assert f"normswap-test-warning {what}" in r.stderr, r.stderr[-3000:]


def test_serve_keeps_vllms_default_stream(monkeypatch):
    """Only JSON commands move vLLM's log stream to stderr; the server's log stays where vLLM puts it."""
    import os

    from vllm_normswap import cli

    monkeypatch.delenv("VLLM_LOGGING_STREAM", raising=False)
    with __import__("pytest").raises(SystemExit):
        cli.main(["serve", "--help"])
    assert "VLLM_LOGGING_STREAM" not in os.environ
