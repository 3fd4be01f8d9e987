# GPU image (the CPU one is deploy/Dockerfile.cpu): the pinned vLLM OpenAI server image + this plugin, one
# NormSwap option server per container, configured by environment variables (deploy/entrypoint.py).
#   docker build -t normswap-gpu:0.1.0 .
#   docker run --rm --gpus all -p 8000:8000 -e NORMSWAP_OPTION=rms-gelu -e NORMSWAP_INT8=1 normswap-gpu:0.1.0
#   docker run ... normswap-gpu:0.1.0 --tensor-parallel-size 2          # arguments are further vLLM flags
# The base tag must match pyproject.toml's vllm pin (the plugin uses vLLM internals of that release);
# tests/monitoring/test_deploy_files.py checks that, and deploy/check_install.py checks the built image.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

WORKDIR /opt/normswap
COPY . .
# The base image's Python already holds vllm 0.32.0, which satisfies the [gpu] extra's pin, so only the plugin
# and its small dependencies are added. Editable: serving_configs/ and the zoo stay beside the package. The image's
# Python is the system one (vLLM installs itself with `uv pip install --system`); on a base whose distribution
# marks it externally managed (PEP 668), the BREAK_SYSTEM_PACKAGES variables let the same command through.
RUN export UV_BREAK_SYSTEM_PACKAGES=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
 && if command -v uv >/dev/null 2>&1; then uv pip install --system -e ".[gpu]"; \
    else python3 -m pip install --no-cache-dir -e ".[gpu]"; fi \
 && python3 deploy/check_install.py

ENV HOST=0.0.0.0 PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['PORT'], timeout=4)"
# replaces the base image's `vllm serve` entrypoint
ENTRYPOINT ["python3", "deploy/entrypoint.py"]
