#!/usr/bin/env bash
# How many compilers the llama-server build may run at once: one per core, but no more than
# one per GiB of available memory (a llama.cpp translation unit takes up to ~1 GiB), and
# at least one.
set -euo pipefail
cores=$(nproc)
avail_kib=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo 2>/dev/null || echo 0)
by_memory=$(( avail_kib / 1048576 ))
jobs=$cores
(( by_memory < jobs )) && jobs=$by_memory
(( jobs < 1 )) && jobs=1
echo "$jobs"
