"""Per-layer activation outlier statistics, exported as Prometheus metrics on vLLM's /metrics.

config.py        ObserverConfig: the ``normswap_observe`` hf-override (thresholds, sites, sampling, on/off)
site_stats.py    torch-only math: one site's counters and histograms as a float64 vector updated in place
host_kernel.py   the same update on CPU, one Numba-compiled pass per site (site_stats uses NumPy without Numba)
layer_stats.py   vLLM glue: LayerStats module per decoder layer, the ``normswap::observe_site`` custom op
metric_files.py  where the multiprocess files go and how ours are named (metric names: registry.py)
publisher.py     worker thread: device counters -> Prometheus multiprocess files
bridge.py        API-server side: those files -> vLLM's /metrics
"""


def register_metrics_bridge() -> None:
    from vllm_normswap.observe.bridge import register_metrics_bridge as _register

    _register()
