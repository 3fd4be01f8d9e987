"""docker-compose.yml's stack without Docker: option servers (through deploy/entrypoint.py, as in the images),
a real Prometheus with the committed config and rules, traffic, and the PNG of the key panels.

    python monitoring/local_stack.py --random --seconds 90 --png docs/img/dashboard-panels.png
    python monitoring/local_stack.py --options ln-gelu rms-gelu --keep    # leave it running; Ctrl-C or SIGTERM stops

Needs the `prometheus` binary (Debian: apt-get install prometheus). Servers listen on 127.0.0.1 only; traffic
goes to them alone and is bounded in time and count. tests/monitoring uses the same pieces.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import yaml
from vllm.utils.network_utils import get_open_port

MONITORING = Path(__file__).resolve().parent
REPO = MONITORING.parent
sys.path.insert(0, str(MONITORING))
from promql import PromAPI  # noqa: E402

ENTRYPOINT = REPO / "deploy" / "entrypoint.py"
THRESHOLDS = (1.0, 3.0, 6.0)  # the observer's |x| thresholds on the local servers
WORDS = ("the model reads a token and writes the next one while the server counts every large activation "
         "in each layer of the network so that we can compare norms and activations side by side").split()


class Prometheus:
    """A real Prometheus on 127.0.0.1 with monitoring/prometheus/ (config, rules) copied into ``workdir``:
    the targets are replaced by ``targets`` (option -> "host:port", or a list of them for replicas) and the
    intervals shortened so a short test sees several scrapes."""

    def __init__(self, targets: dict[str, str | list[str]], workdir: Path, port: int, interval: str = "1s"):
        self.targets, self.workdir, self.port, self.interval = targets, Path(workdir), port, interval
        self.url = f"http://127.0.0.1:{port}"
        self.api = PromAPI(self.url)
        self.proc: subprocess.Popen | None = None

    def write_config(self) -> Path:
        conf = self.workdir / "prometheus"
        shutil.rmtree(conf, ignore_errors=True)
        shutil.copytree(MONITORING / "prometheus", conf, ignore=shutil.ignore_patterns("targets", "tests"))
        config = yaml.safe_load((conf / "prometheus.yml").read_text())
        config["global"].update(scrape_interval=self.interval, evaluation_interval=self.interval)
        (conf / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        (conf / "targets").mkdir()
        entries = [{"targets": [addr] if isinstance(addr, str) else list(addr), "labels": {"option": option}}
                   for option, addr in self.targets.items()]
        (conf / "targets" / "local.yml").write_text(yaml.safe_dump(entries))
        return conf / "prometheus.yml"

    def start(self, timeout: float = 60) -> "Prometheus":
        config = self.write_config()
        self.log = open(self.workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {timeout}s:\n{self.log_tail()}")

    def wait_scraped(self, n_targets: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(t["health"] == "up" for t in self.api.targets()) >= n_targets:
                return
            time.sleep(0.5)
        raise AssertionError(f"targets not up after {timeout}s: {self.api.targets()}")

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def option_server(option: str, model: str | Path, port: int, log_dir: Path, observe: dict | None = None,
                  probe_shift: float = 0.0, extra: list[str] = (), cores: str | None = None):
    """A vLLM server for one option started the way the images start it (deploy/entrypoint.py). ``cores``:
    the CPU cores its worker binds to (VLLM_CPU_OMP_THREADS_BIND, e.g. "1" or "0-3"); CPU servers sharing a
    machine must get disjoint cores, else their spinning OpenMP threads starve each other."""
    from vllm_normswap.runtime.server import VLLMServer

    env = {"VLLM_CPU_OMP_THREADS_BIND": cores} if cores else {}
    env |= {"NORMSWAP_OPTION": option, "NORMSWAP_MODEL": str(model), "HOST": "127.0.0.1", "PORT": str(port),
           "NORMSWAP_OBSERVE": json.dumps(observe or {}), "NORMSWAP_PROBE_SHIFT": str(probe_shift)}
    return VLLMServer([sys.executable, str(ENTRYPOINT), *extra], Path(log_dir) / f"{option}.log", env=env,
                      port=port)


def core_share(i: int, n: int, ncores: int) -> str:
    """Server i of n: its slice of the cores ("0-3"), or one core shared round-robin when n > ncores."""
    if n >= ncores:
        return str(i % ncores)
    per = ncores // n
    return f"{i * per}-{(i + 1) * per - 1}" if per > 1 else str(i * per)


def stream_completion(url: str, model: str, prompt: str, max_tokens: int) -> int:
    """One streamed completion (fills TTFT and inter-token histograms); returns the chunks received."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
            "ignore_eos": True}
    req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    chunks = 0
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            chunks += line.startswith(b"data: {")
    return chunks


def send_traffic(servers: dict[str, str], seconds: float, concurrency: int = 2, max_requests: int = 2000,
                 max_tokens: int = 16, seed: int = 0) -> dict[str, int]:
    """Requests to every server (model name -> base URL) for ``seconds``; returns completed requests each."""
    done = {model: 0 for model in servers}
    errors: list[BaseException] = []
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def worker(model: str, url: str, k: int):
        rng = random.Random(seed * 1000 + k)
        while time.monotonic() < deadline and sum(done.values()) < max_requests and not errors:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(8, 64)))
            try:
                stream_completion(url, model, prompt, max_tokens)
            except BaseException as e:  # noqa: BLE001 - reported to the caller below
                errors.append(e)
                return
            with lock:
                done[model] += 1

    threads = [threading.Thread(target=worker, args=(m, u, i * concurrency + j), daemon=True)
               for i, (m, u) in enumerate(servers.items()) for j in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"traffic failed: {errors[0]!r}") from errors[0]
    return done


def random_checkpoints(options, root: Path, layers: int = 4, hidden: int = 256) -> dict[str, Path]:
    """Small random checkpoints (head_dim 64 for vLLM's CPU attention), one tokenizer shared by all."""
    from vllm_normswap.checkpoints.random_init import make_arch, write_random_checkpoint
    from vllm_normswap.checkpoints.tokenizer import stdlib_sample, train_bpe

    tok = train_bpe(stdlib_sample(200_000), 512)
    return {o: write_random_checkpoint(root / o, make_arch(o, hidden_size=hidden, layers=layers, heads=hidden // 64,
                                                           vocab_size=512, initializer_range=0.1),
                                       seed=i, bias_std=0.05, tokenizer=tok)
            for i, o in enumerate(options)}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    from vllm_normswap.registry import OPTIONS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    p.add_argument("--random", action="store_true", help="serve small random checkpoints instead of the zoo")
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "local-stack")
    p.add_argument("--seconds", type=float, default=90, help="traffic duration")
    p.add_argument("--probe-shift", type=float, default=0.0, help="mean-shift probe c on every server")
    p.add_argument("--png", type=Path, help="render the key panels to this PNG at the end")
    p.add_argument("--site", default="act_out", help="site of the PNG's outlier panels")
    p.add_argument("--threshold", type=float, default=6.0, choices=THRESHOLDS,
                   help="|x| threshold of the PNG's outlier panels")
    p.add_argument("--keep", action="store_true", help="keep everything running after the traffic")
    p.add_argument("vllm_flags", nargs="*", help="extra vLLM flags (after --), e.g. -- --enforce-eager")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    # SIGTERM (kill, timeout, a container stop) tears down like Ctrl-C; a shell's background job ignores SIGINT
    signal.signal(signal.SIGTERM, _interrupt)
    if args.random:
        models = random_checkpoints(args.options, args.workdir / "ckpt")
    else:
        from vllm_normswap.serve import default_model
        models = {o: default_model(o) for o in args.options}
    observe = {"thresholds": list(THRESHOLDS), "publish_interval_s": 1.0}
    # random checkpoints have a long position table; a short window keeps their KV cache small. The zoo models'
    # own window (256) is already short, and a longer --max-model-len would be refused.
    window = ["--max-model-len", "512"] if args.random else []
    servers, urls = [], {}
    try:
        ncores = os.cpu_count() or 1
        for i, option in enumerate(args.options):  # started one at a time; each gets its own core(s)
            s = option_server(option, models[option], get_open_port(), args.workdir, observe,
                              args.probe_shift, [*window, *args.vllm_flags],
                              cores=core_share(i, len(args.options), ncores))
            servers.append(s)
            s.start().wait_healthy()
            urls[option] = s.url
            print(f"{option}: {s.url}", flush=True)
        targets = {o: u.removeprefix("http://") for o, u in urls.items()}
        with Prometheus(targets, args.workdir, get_open_port()) as prom:
            prom.wait_scraped(len(targets))
            print(f"prometheus: {prom.url}", flush=True)
            t0 = time.time()
            print("requests completed:", send_traffic(urls, args.seconds), flush=True)
            time.sleep(3)  # one more publish + scrape + rule evaluation
            if args.png:
                from render_panels import render
                empty = render(prom.api, list(urls), t0, time.time(), args.png, args.site, f"{args.threshold:g}")
                print(f"wrote {args.png}" + (f"; panels without data: {empty}" if empty else ""))
            if args.keep:
                print("running; Ctrl-C stops", flush=True)
                while True:
                    time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for s in servers:
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
