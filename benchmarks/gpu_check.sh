#!/usr/bin/env bash
# The GPU check of normswap_int8: one prepared run that fits a GPU for 10 minutes (the step limits
# add up to 590 s). Everything lands as JSON under the output dir, summary.json first among them.
#
#   benchmarks/gpu_check.sh [--out DIR] [--venv DIR] [--steps a,b,...] [--dry-run]
#
# --out: default $OUT if set, else gpu_check_out/. --venv: the GPU environment, default .venv-gpu.
# --steps: only these steps (e.g. the ones a previous run did not reach; install is needed once per machine).
# --dry-run (CPU, CI): check that every file exists and every pytest selection collects, write the steps' JSON
#   as planned, print the plan with its time limits; install nothing, run nothing heavy. PYTHON (default python3)
#   runs the helper, and in a dry run collects the tests.
#
# The steps, most informative first, and why each is there:
#   gpu_info           nvidia-smi's GPU, driver and clocks: the figures below mean nothing without them.
#   install            the CUDA vLLM wheel (scripts/install.sh gpu, test extras only): the CPU wheel has no GPU
#                      kernels. Its duration says how much of the 10 minutes is left for the rest.
#   versions           torch, CUDA and vLLM as installed, and which vLLM kernel the int8 layers get (Machete
#                      on sm90, else Marlin): the kernel choice is the first thing that can go wrong.
#   test_int8_vllm     the GPU path has never run: KL against bf16, offline checkpoint == online quantization
#                      bit for bit (in the kernel's layout), the int8 LM head refused on GPU with its message.
#                      Left out: TP 2 (needs two GPUs) and the misconfiguration messages (checked before any
#                      kernel is chosen, the same on CPU, where CI covers them): four engine starts saved.
#   test_int8_options  every option of the registry (biases, LayerNorm, GELU) through the GPU kernel.
#   bench_int8         int8 vs bf16 decode at batch 1/8/32 and 512-token prefill on the 1.0B Llama shape, with
#                      torch.compile and CUDA graphs (vLLM's default): weight-only int8 pays off only where
#                      decode is bandwidth-bound, which only a real GPU shows.
#   bench_observer     the activation observer on vs off with CUDA graphs: graph capture is where a host-side
#                      observer breaks or costs most.
# A failing or hung step is recorded and the next one runs; each is killed at its own limit.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-gpu_check_out}
venv=.venv-gpu
only=""
dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --venv) venv=$2; shift 2 ;;
        --steps) only=",$2,"; shift 2 ;;
        --dry-run) dry=1; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "usage: $0 [--out DIR] [--venv DIR] [--steps a,b,...] [--dry-run]" >&2; exit 2 ;;
    esac
done
cd "$here"
PYTHON=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -rf "$out/steps" "$out/summary.json"  # a previous run's step records would mix into this summary
py="$venv/bin/python"

# no network waits on the GPU machine: the models are local, and usage reports go nowhere
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

failed=0
step() {  # NAME LIMIT_S [--stdout-json | --junit] -- COMMAND...
    local name=$1 limit=$2
    shift 2
    case "$only" in ""|*",$name,"*) ;; *) return 0 ;; esac
    local extra=()
    [ "$dry" = 1 ] && extra=(--dry-run --python "$PYTHON")
    "$PYTHON" benchmarks/gpu_check.py step --out "$out" --name "$name" --limit "$limit" ${extra[@]+"${extra[@]}"} "$@" \
        || failed=1
}
junit() { echo "--junitxml=$out/$1.junit.xml"; }
pytest_opts=(-q -p no:cacheprovider -o junit_logging=system-out -o junit_log_passing_tests=true)

[ "$dry" = 1 ] && echo "gpu_check plan (dry run; output dir $out):"
step gpu_info 10 --stdout-json -- "$PYTHON" benchmarks/gpu_probe.py gpu-info
step install 170 -- env VENV="$venv" EXTRAS=test scripts/install.sh gpu
step versions 20 --stdout-json -- "$py" benchmarks/gpu_probe.py versions
step test_int8_vllm 120 --junit -- "$py" -m pytest tests/quant/test_int8_vllm.py "${pytest_opts[@]}" \
    -k "not tp2 and not misconfiguration" "$(junit test_int8_vllm)"
step test_int8_options 100 --junit -- "$py" -m pytest tests/quant/test_int8_options.py "${pytest_opts[@]}" \
    "$(junit test_int8_options)"
step bench_int8 100 --stdout-json -- "$py" benchmarks/bench_int8.py --device cuda --compiled --batches 1,8,32
step bench_observer 70 --stdout-json -- "$py" benchmarks/bench_observer.py --rounds 1 --reps 2 --layers 4

"$PYTHON" benchmarks/gpu_check.py finish --out "$out" || failed=1
exit "$failed"
