"""Corral's benchmarks. Run each from the repository root as a module, so that the shared
test support (``tests.harness``, ``tests.procfs``) and ``scripts.llama_paths`` import
without path tricks: ``.venv/bin/python -m bench.run_all`` (``make bench``) or
``.venv/bin/python -m bench.respawn`` ...

- ``report``: figures (stats), the machine, progress, the printed table and the JSON file
- ``procs``: probing /health and watching processes through /proc
- ``supervisors``: the two supervisors under test (Corral, supervisord) and a bare
  llama-server, on the real model
"""
