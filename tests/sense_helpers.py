"""Fakes for the machine facts: /proc/meminfo, cgroup trees, llama-fit-params, GGUF files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from corral.sense.memory import MemorySource


def fake_memory(tmp_path: Path, available_mib: int, cgroup_room_mib: int | None = None,
                version: int = 2) -> MemorySource:
    """A MemorySource over fake files: MemAvailable and, optionally, a cgroup limit."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: 99999999 kB\nMemAvailable: {available_mib * 1024} kB\n")
    root = tmp_path / "cgroup"
    self_cgroup = tmp_path / "self_cgroup"
    if version == 2:
        group = root / "corral.slice"
        self_cgroup.write_text("0::/corral.slice\n")
        files = ("memory.max", "memory.current")
    else:
        group = root / "memory" / "box"
        self_cgroup.write_text("5:devices:/\n4:memory:/box\n0::/\n")
        files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
    group.mkdir(parents=True)
    if cgroup_room_mib is None:
        (group / files[0]).write_text("max\n" if version == 2 else f"{1 << 62}\n")
        (group / files[1]).write_text("0\n")
    else:
        used = 100 << 20
        (group / files[0]).write_text(f"{(cgroup_room_mib << 20) + used}\n")
        (group / files[1]).write_text(f"{used}\n")
    return MemorySource(meminfo, root, self_cgroup)


def fake_fit_params(tmp_path: Path, calls: Path | None = None) -> Path:
    """A llama-fit-params that prints llama.cpp's line: 3 KiB of context per -c token."""
    path = tmp_path / "llama-fit-params"
    log = f"open({str(calls)!r}, 'a').write('x')" if calls else "pass"
    path.write_text(f"""#!{sys.executable}
import sys
{log}
a = sys.argv
if "--port" in a:
    print("error: invalid argument: --port", file=sys.stderr); sys.exit(1)
head = open(a[a.index("--model") + 1], "rb").read(4096)
if head[:4] != b"GGUF" or len(head) < 4096:  # llama.cpp cannot load a cut-off file
    print("failed to load model", file=sys.stderr); sys.exit(134)
c = int(a[a.index("--ctx-size") + 1]) if "--ctx-size" in a else 32768
print("llama_fit_params: printing estimated memory in MiB", file=sys.stderr)
print(f"Host 222 {{c * 3 // 1024}} {{512 + c // 1024}} ")
""")
    path.chmod(0o755)
    return path


def tiny_gemma(path: Path, vocab: int = 1000) -> Path:
    """A GGUF with gemma3-270m's attention shape and a tiny vocabulary."""
    w = GGUFWriter(str(path), "gemma3")
    w.add_context_length(32768)
    w.add_block_count(18)
    w.add_head_count(4)
    w.add_head_count_kv(1)
    w.add_key_length(256)
    w.add_value_length(256)
    w.add_sliding_window(512)
    w.add_embedding_length(640)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(vocab)])
    w.add_tensor("token_embd.weight", np.zeros((vocab, 640), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
