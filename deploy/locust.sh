#!/bin/sh
# Locust in the normswap image (docker-compose.yml profile "load", deploy/k8s/locust.yaml), master or worker:
#   deploy/locust.sh --master --expect-workers 2 -H http://rms-gelu:8000 ...   |   deploy/locust.sh --worker --master-host M
# Writes the seeded workload to $NORMSWAP_WORKLOAD if it is not there: every worker builds the same file (same
# seed, same held-out corpus in the same image), so no shared volume is needed (the master forwards its own
# NORMSWAP_WORKLOAD / NORMSWAP_RECORDS values to the workers, so keep the paths identical on both sides).
set -eu
export NORMSWAP_WORKLOAD="${NORMSWAP_WORKLOAD:-/tmp/normswap/prompts.jsonl}"
if [ ! -f "$NORMSWAP_WORKLOAD" ]; then
    python -c 'import sys
from vllm_normswap.ab.workload import build_workload
build_workload(max_tokens=int(sys.argv[2])).save_prompts(sys.argv[1])' "$NORMSWAP_WORKLOAD" "${NORMSWAP_MAX_TOKENS:-16}"
fi
# the locustfile ships in the installed package (package data), wherever pip put it
exec locust -f "$(python -m vllm_normswap.load_tests)/locustfile.py" "$@"
