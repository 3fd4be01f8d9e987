"""``python -m vllm_normswap.load_tests``: print the directory holding the locust files."""

from vllm_normswap.load_tests import DIR

print(DIR)
