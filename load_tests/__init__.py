"""The locust files shipped with the package (package data, read by ``vllm_normswap.ab.loadgen``).

Run locust on them from any install:  ``locust -f "$(python -m vllm_normswap.load_tests)/locustfile.py" ...``
(``python -m vllm_normswap.load_tests`` prints this directory; see README.md here).
"""

from importlib.resources import files

DIR = files(__name__)
LOCUSTFILE = DIR / "locustfile.py"
RATE_SWEEP = DIR / "rate_sweep.py"
SOAK_LOCUSTFILE = DIR / "soak_locustfile.py"
