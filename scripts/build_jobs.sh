#!/usr/bin/env bash
# How many compilers the llama-server build may run at once: one per core, but no more than
# one per GiB of available memory (a llama.cpp translation unit takes up to ~1 GiB), and
# at least one. (BUILD_JOBS_MEMINFO: another meminfo file, for tests/test_build_bound.py.)
set -euo pipefail
# The cores this process may run on; not OMP_NUM_THREADS/OMP_THREAD_LIMIT, which nproc
# would otherwise report as they are (OMP_NUM_THREADS=64 read as 64 cores).
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
avail_kib=$(awk '/^MemAvailable:/ {print $2}' "${BUILD_JOBS_MEMINFO:-/proc/meminfo}" 2>/dev/null || echo 0)
by_memory=$(( ${avail_kib:-0} / 1048576 ))
jobs=$cores
(( by_memory < jobs )) && jobs=$by_memory
(( jobs < 1 )) && jobs=1
echo "$jobs"
