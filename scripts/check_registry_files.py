"""Check the files that cannot import the registry (compose, k8s, Prometheus, Grafana JSON, serving configs)
against ``vllm_normswap.registry``; print every disagreement as ``path:line: message`` and exit 1 if any.

    python scripts/check_registry_files.py

What each file must agree on:
- docker-compose.yml, deploy/compose.gpu.yml: one server (a service built from our Dockerfile) per option, named
  by its id (docker-compose.yml: NORMSWAP_OPTION too);
- deploy/k8s/*.yaml: one server Deployment and one Service per option (NORMSWAP_OPTION = name); locust targets an
  option's Service;
- monitoring/prometheus/targets/compose.yml: one target per option (host and ``option`` label = its id);
- monitoring/prometheus/prometheus*.yml, rules/*.yml, the Grafana dashboard: every ``normswap_*`` series in an
  expression is a registry metric, every ``site="..."`` a registry site, every ``threshold="..."`` a default
  threshold; the dashboard's site variable lists the sites in order;
- serving_configs/OPTION.yaml: one per option, ``served-model-name`` and ``expect_option`` = its
  id, its header names the option's case-study number.
The per-option servers and targets, and a missing serving config, are generated: python scripts/gen_deploy.py.

``check_files(options=...)`` takes another registry, so a test can add an option and see what each file lacks.
Line 0 stands for a file that is missing as a whole.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

from vllm_normswap.registry import (ABSMAX, DEFAULT_THRESHOLDS, ELEMENTS, OPTIONS, OUTLIERS, SITES, TOKEN_HISTOGRAMS,
                                    Option)

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = "monitoring/grafana/dashboards/normswap-ab.json"
# the series Prometheus exposes for each registry metric (counters: _total; histograms: _bucket/_sum/_count)
SERIES = ({OUTLIERS + "_total", ELEMENTS + "_total", ABSMAX}
          | {f"{h}_{s}" for h in TOKEN_HISTOGRAMS.values() for s in ("bucket", "sum", "count")})


def serving_dir(root: Path) -> Path:
    """Where the serving configs live: the repository's top level (the wheel maps it into the package)."""
    return root / "serving_configs"


def threshold_label(tau: float) -> str:  # the observer's label format: 6.0 -> "6"
    return f"{tau:g}"


# ---- YAML with line numbers ----------------------------------------------------------------------------------

def _plain(node):
    if isinstance(node, yaml.MappingNode):
        return {_plain(k): _plain(v) for k, v in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [_plain(v) for v in node.value]
    return node.value


def _get(node, key):
    """The value node under ``key`` of a mapping node (None if absent), with merge keys (<<) resolved."""
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if k.value == key:
            return v
    for k, v in node.value:
        if k.tag == "tag:yaml.org,2002:merge" or k.value == "<<":
            found = _get(v, key)
            if found is not None:
                return found
    return None


def _line(node) -> int:
    return node.start_mark.line + 1


def _env(container) -> dict[str, yaml.Node]:
    """k8s container env (list of {name, value}) or compose environment (mapping) as name -> value node."""
    env = _get(container, "env") or _get(container, "environment")
    if isinstance(env, yaml.SequenceNode):
        return {_get(e, "name").value: _get(e, "value") for e in env.value}
    if isinstance(env, yaml.MappingNode):
        out = {}
        for k, v in env.value:
            if k.value == "<<":
                out = {**_env_merge(v), **out}
            else:
                out[k.value] = v
        return out
    return {}


def _env_merge(node) -> dict:
    return {k.value: v for k, v in node.value} if isinstance(node, yaml.MappingNode) else {}


def _compare(path: str, what: str, found: dict[str, int], options: dict[str, Option], where: int) -> list[str]:
    """Problems for a set of option ids found in a file (id -> line) against the registry."""
    problems = [f"{path}:{where}: missing {what} for option {o!r}" for o in options if o not in found]
    problems += [f"{path}:{line}: extra {what} {o!r}: not an option of the registry ({', '.join(options)})"
                 for o, line in found.items() if o not in options]
    return problems


# ---- the files -----------------------------------------------------------------------------------------------

def check_compose(root: Path, path: str, options, env_key: str | None) -> list[str]:
    doc = yaml.compose((root / path).read_text())
    services = _get(doc, "services")
    found, problems = {}, []
    for key, service in services.value:
        if _get(service, "build") is None:
            continue  # an option server is built from our Dockerfile; Prometheus, Grafana and locust are not
        found[key.value] = _line(key)
        if env_key:
            value = _env(service).get(env_key)
            if value is None or value.value != key.value:
                problems.append(f"{path}:{_line(value or key)}: service {key.value!r} sets {env_key}="
                                f"{value.value if value is not None else None!r}; it must be {key.value!r}")
    return _compare(path, "service", found, options, _line(services) - 1) + problems


def check_k8s(root: Path, options) -> list[str]:
    problems = []
    for file in sorted((root / "deploy" / "k8s").glob("*.yaml")):
        path = str(file.relative_to(root))
        docs = [d for d in yaml.compose_all(file.read_text()) if d is not None]
        servers: dict[str, dict[str, int]] = {"Deployment": {}, "Service": {}}
        first = None
        for doc in docs:
            kind = _get(doc, "kind").value
            meta = _get(doc, "metadata")
            labels = _plain(_get(meta, "labels") or yaml.MappingNode("", []))
            if labels.get("app.kubernetes.io/component") != "server" or kind not in servers:
                continue
            name = _get(meta, "name")
            first = first or _line(doc)
            servers[kind][name.value] = _line(name)
            if labels.get("app.kubernetes.io/instance") != name.value:
                problems.append(f"{path}:{_line(name)}: {kind} {name.value!r} has app.kubernetes.io/instance "
                                f"{labels.get('app.kubernetes.io/instance')!r}; it must be its name")
            if kind == "Deployment":
                for c in _get(_get(_get(_get(doc, "spec"), "template"), "spec"), "containers").value:
                    value = _env(c).get("NORMSWAP_OPTION")
                    if value is None or value.value != name.value:
                        problems.append(f"{path}:{_line(value or name)}: Deployment {name.value!r} sets "
                                        f"NORMSWAP_OPTION={value.value if value is not None else None!r}; it must "
                                        f"be {name.value!r}")
        if first is not None:
            for kind, found in servers.items():
                problems += _compare(path, kind, found, options, first)
        for n, line in enumerate(file.read_text().splitlines(), 1):  # locust's target host is an option Service
            for host in re.findall(r"http://([\w.-]+):8000", line):
                if host not in options:
                    problems.append(f"{path}:{n}: targets http://{host}:8000, not an option's Service "
                                    f"({', '.join(options)})")
    return problems


def check_targets(root: Path, options) -> list[str]:
    path = "monitoring/prometheus/targets/compose.yml"
    entries = yaml.compose((root / path).read_text())
    found, problems = {}, []
    for entry in entries.value:
        option = _get(_get(entry, "labels"), "option")
        found[option.value] = _line(option)
        hosts = [t.value.split(":")[0] for t in _get(entry, "targets").value]
        if any(h != option.value for h in hosts):
            problems.append(f"{path}:{_line(entry)}: target(s) {hosts} are labelled option={option.value!r}; the "
                            "compose service of an option is named by its id")
    return _compare(path, "target", found, options, _line(entries)) + problems


def _check_expr(path: str, line, expr: str, sites) -> list[str]:
    """``line(offset)``: the file line of character ``offset`` of ``expr``."""
    problems, seen = [], set()
    labels = [threshold_label(t) for t in DEFAULT_THRESHOLDS]
    for m in re.finditer(r'\b(normswap_[a-z_]+)|site="(\w+)"|threshold="([\d.]+)"', expr):
        name, site, tau = m.groups()
        if name and name not in SERIES:
            problem = f"series {name!r} is not a registry metric ({', '.join(sorted(SERIES))})"
        elif site and site not in sites:
            problem = f"site {site!r} is not a registry site ({', '.join(sites)})"
        elif tau and tau not in labels:
            problem = f"threshold {tau!r} is not a default threshold ({', '.join(labels)})"
        else:
            continue
        if problem not in seen:
            seen.add(problem)
            problems.append(f"{path}:{line(m.start())}: {problem}")
    return problems


def _node_lines(node):
    """offset in a scalar's value -> file line (a block scalar's value starts on the line after its indicator)."""
    if node.style in ("|", ">"):
        return lambda offset: _line(node) + 1 + node.value[:offset].count("\n")
    return lambda offset: _line(node)


def check_prometheus(root: Path, sites) -> list[str]:
    problems = []
    files = sorted((root / "monitoring" / "prometheus").glob("prometheus*.yml"))
    files += sorted((root / "monitoring" / "prometheus" / "rules").glob("*.yml"))
    for file in files:
        path = str(file.relative_to(root))
        doc = yaml.compose(file.read_text())
        for rule_file in _plain(_get(doc, "rule_files") or yaml.SequenceNode("", [])):
            if not (file.parent / rule_file).is_file():
                problems.append(f"{path}:{_line(_get(doc, 'rule_files'))}: rule file {rule_file!r} does not exist")
        for group in (_get(doc, "groups").value if _get(doc, "groups") else []):
            for rule in _get(group, "rules").value:
                expr = _get(rule, "expr")
                problems += _check_expr(path, _node_lines(expr), expr.value, sites)
    return problems


def check_dashboard(root: Path, sites) -> list[str]:
    path = DASHBOARD
    text = (root / path).read_text()
    lines = text.splitlines()
    problems = []

    def line_of(value: str) -> int:
        needle = json.dumps(value)
        return next((n for n, line in enumerate(lines, 1) if needle in line), 0)

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query") and isinstance(value, str):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    dashboard = json.loads(text)
    for expr in sorted(set(walk(dashboard))):
        problems += _check_expr(path, lambda offset, expr=expr: line_of(expr), expr, sites)
    site_var = next((v for v in dashboard["templating"]["list"] if v["name"] == "site"), None)
    if site_var is None or site_var["query"] != ",".join(sites):
        got = site_var["query"] if site_var else None
        problems.append(f"{path}:{line_of(got) if got else 0}: the site variable lists {got!r}; the registry's "
                        f"sites are {','.join(sites)!r} (regenerate: python monitoring/grafana/dashboard.py)")
    return problems


def check_serving_configs(root: Path, options) -> list[str]:
    folder = serving_dir(root)
    problems = []
    for file in sorted(folder.glob("*.yaml")):
        path = str(file.relative_to(root))
        option = options.get(file.stem)
        if option is None:
            problems.append(f"{path}:1: extra serving config {file.stem!r}: not an option of the registry "
                            f"({', '.join(options)})")
            continue
        text = file.read_text()
        doc = yaml.compose(text)
        for what, node in (("served-model-name", _get(doc, "served-model-name")),
                           ("hf-overrides.expect_option", _get(_get(doc, "hf-overrides"), "expect_option"))):
            if node is None or node.value != option.id:
                problems.append(f"{path}:{_line(node) if node is not None else 1}: {what} is "
                                f"{node.value if node is not None else None!r}; it must be {option.id!r}")
        header = re.search(r"^# Option (\d+)", text, re.M)
        if header is None or int(header.group(1)) != option.case_study:
            n = text[: header.start()].count("\n") + 1 if header else 1
            problems.append(f"{path}:{n}: the header must name the option's case-study number: "
                            f"'# Option {option.case_study}'")
    for option in options:
        if not (folder / f"{option}.yaml").is_file():
            problems.append(f"{(folder / f'{option}.yaml').relative_to(root)}:0: missing file: the serving config "
                            f"of option {option!r}")
    return problems


def check_files(options: dict[str, Option] = OPTIONS, sites: tuple[str, ...] = SITES, root: Path = ROOT) -> list[str]:
    """Every disagreement between the registry (``options``, ``sites``) and the files under ``root``."""
    return (check_compose(root, "docker-compose.yml", options, "NORMSWAP_OPTION")
            + check_compose(root, "deploy/compose.gpu.yml", options, None)
            + check_k8s(root, options)
            + check_targets(root, options)
            + check_prometheus(root, sites)
            + check_dashboard(root, sites)
            + check_serving_configs(root, options))


def main() -> int:
    problems = check_files()
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
