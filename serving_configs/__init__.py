"""One vLLM server config per option (``normswap serve OPTION --print-config``), shipped as package data:
``vllm_normswap.serving_configs`` in a wheel and in an editable install (pyproject.toml maps this folder there).

This file makes the folder a regular package, so that ``importlib.resources.files`` returns a plain path to it.
"""
