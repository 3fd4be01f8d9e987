"""Contract with prometheus_client's private multiprocess API, which vllm_normswap/observe/publisher.py writes
through (pyproject bounds prometheus_client to the versions tested). Each test names the API it pins, so a
prometheus_client upgrade that changes it fails here, by name, and not as wrong numbers on /metrics."""

from __future__ import annotations

import inspect

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

# (callable, the parameter names the publisher relies on, in order)
EXPECTED = {
    "prometheus_client.mmap_dict.MmapedDict.__init__": (MmapedDict.__init__, ["self", "filename", "read_mode"]),
    "prometheus_client.mmap_dict.MmapedDict.write_value": (MmapedDict.write_value,
                                                            ["self", "key", "value", "timestamp"]),
    "prometheus_client.mmap_dict.MmapedDict.close": (MmapedDict.close, ["self"]),
    "prometheus_client.mmap_dict.mmap_key": (mmap_key,
                                             ["metric_name", "name", "labelnames", "labelvalues", "help_text"]),
    "prometheus_client.utils.floatToGoString": (floatToGoString, ["d"]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_private_api_signature(name):
    func, params = EXPECTED[name]
    got = list(inspect.signature(func).parameters)
    assert got == params, (f"{name} changed signature: {got}, vllm_normswap/observe/publisher.py calls it with "
                           f"{params}; adapt the publisher and the prometheus_client bound in pyproject.toml")


def test_publisher_uses_no_more_of_the_private_api():
    """If the publisher starts importing more of prometheus_client's submodules, pin that here too."""
    import ast

    import vllm_normswap.observe.publisher as publisher

    tree = ast.parse(inspect.getsource(publisher))
    used = {f"{node.module}.{alias.name}" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prometheus_client.")
            for alias in node.names}
    pinned = {name.rsplit(".", 1)[0] if name.endswith(("__init__", "write_value", "close")) else name
              for name in EXPECTED}
    assert used <= pinned, f"not pinned by this contract test: {sorted(used - pinned)}"


def test_files_written_this_way_are_read_by_the_multiprocess_collector(tmp_path):
    """The file-name scheme ({type}_[{mode}_]{id}.db) and key format the publisher relies on, end to end."""
    d = MmapedDict(str(tmp_path / "counter_4242.db"))
    d.write_value(mmap_key("normswap_contract", "normswap_contract_total", ["layer"], ["0"], "contract"), 7.0, 0.0)
    d.close()
    g = MmapedDict(str(tmp_path / "gauge_max_4242.db"))
    g.write_value(mmap_key("normswap_contract_max", "normswap_contract_max", ["layer"], ["0"], "contract"), 2.5, 0.0)
    g.close()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    assert registry.get_sample_value("normswap_contract_total", {"layer": "0"}) == 7.0
    assert registry.get_sample_value("normswap_contract_max", {"layer": "0"}) == 2.5
    assert floatToGoString(6.0) == "6.0" and floatToGoString(float("inf")) == "+Inf"
