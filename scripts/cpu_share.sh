#!/usr/bin/env bash
# Run a command with the CPU time of CPUS cores while every core stays visible: a slower machine of the same
# shape. With scripts/as_avx2.sh it stands in for a 2-core AVX2-only CPU, which ran this suite about 2x slower
# than a 2-core CPU with AVX512-BF16:
#
#   scripts/cpu_share.sh 1 scripts/as_avx2.sh .venv/bin/python -m pytest -m "not slow" -n 2
#
# Needs root and a writable cgroup cpu controller (v1: /sys/fs/cgroup/cpu; v2: "cpu" in cgroup.controllers).
# vLLM still sees (and binds its threads to) every core; the kernel throttles the command's processes together
# once they have used CPUS x the period in a period. A short period (10 ms) keeps each stall shorter than the
# timing tolerances of the tests. At the end it prints how often the command was throttled.
set -euo pipefail
[ $# -gt 1 ] || { echo "usage: scripts/cpu_share.sh CPUS COMMAND [ARGS...]   (CPUS: a number of cores, e.g. 1 or 0.5)" >&2; exit 2; }
cpus=$1; shift
period=10000
quota=$(awk -v c="$cpus" -v p="$period" 'BEGIN { q = int(c * p); if (q < 1000) q = 1000; print q }')
name=normswap_cpu_share_$$
if grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null && [ -w /sys/fs/cgroup ]; then
    root=/sys/fs/cgroup; dir=$root/$name
    mkdir "$dir" && echo "$quota $period" >"$dir/cpu.max"
elif [ -w /sys/fs/cgroup/cpu ]; then
    root=/sys/fs/cgroup/cpu; dir=$root/$name
    mkdir "$dir" && echo "$period" >"$dir/cpu.cfs_period_us" && echo "$quota" >"$dir/cpu.cfs_quota_us"
else
    echo "cpu_share: no writable cgroup cpu controller (needs root; v1 /sys/fs/cgroup/cpu or v2 with cpu enabled)" >&2
    exit 2
fi
cleanup() {
    echo $$ >"$root/cgroup.procs" 2>/dev/null || true
    grep -E '^(nr_periods|nr_throttled|throttled_(time|usec))' "$dir/cpu.stat" | tr '\n' ' ' | sed 's/^/cpu_share: /' >&2
    echo >&2
    # helpers that exit once their parent is gone (a fork server reads EOF) may take a moment
    for _ in $(seq 50); do [ -n "$(cat "$dir/cgroup.procs" 2>/dev/null)" ] || break; sleep 0.2; done
    rmdir "$dir" 2>/dev/null || echo "cpu_share: $dir still holds processes; remove it when they have ended" >&2
}
trap cleanup EXIT
echo $$ >"$dir/cgroup.procs"  # this shell; the command and its children inherit the group
echo "cpu_share: ${quota} us of CPU per ${period} us ($cpus of $(nproc) cores) in $dir" >&2
"$@"
