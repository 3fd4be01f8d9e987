"""The A/B: workload, quality through the endpoint, load runs, /metrics scraping, the driver and the report."""
