# syntax=docker/dockerfile:1
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
# Only what runs beside the package: the entrypoint, the install check and the pins it reads.
COPY pyproject.toml ./
COPY deploy/ deploy/
# The base image's Python already holds vllm 0.32.0, which satisfies the [gpu] extra's pin, so only the plugin
# (as a built wheel: serving configs and the zoo are package data) and its small dependencies are added; no test
# or dev extras. The source is bind-mounted for the build only (BuildKit; writable, changes discarded). The
# image's Python is the system one (vLLM installs itself with `uv pip install --system`); on a base whose
# distribution marks it externally managed (PEP 668), the BREAK_SYSTEM_PACKAGES variables let the same command
# through.
RUN --mount=type=bind,source=.,target=/tmp/src,rw \
    export UV_BREAK_SYSTEM_PACKAGES=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
 && python3 -m pip wheel --no-cache-dir --no-deps -w /tmp/dist /tmp/src \
 && wheel="$(ls /tmp/dist/vllm_normswap-*.whl)" \
 && if command -v uv >/dev/null 2>&1; then uv pip install --system "${wheel}[gpu]"; \
    else python3 -m pip install --no-cache-dir "${wheel}[gpu]"; fi \
 && rm -rf /tmp/dist \
 && python3 deploy/check_install.py

# not root: a numeric user, so that Kubernetes' runAsNonRoot can verify it (deploy/k8s/servers.yaml); the installed
# package, its configs and the zoo stay root-owned, read-only to the server. Key the server with VLLM_API_KEY.
RUN useradd --create-home --uid 10001 --user-group normswap
USER 10001
ENV HOST=0.0.0.0 PORT=8000 HOME=/home/normswap
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['PORT'], timeout=4)"
# replaces the base image's `vllm serve` entrypoint
ENTRYPOINT ["python3", "deploy/entrypoint.py"]
