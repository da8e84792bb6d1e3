"""GPU memory from ``nvidia-smi``, when it is on PATH (no GPU: an empty tuple)."""

from __future__ import annotations

import logging
import shutil
import subprocess

from corral.core.fit import GpuRoom

log = logging.getLogger("corral.sense")

QUERY = ["--query-gpu=memory.free,memory.total", "--format=csv"]
MIB = 1 << 20


def gpu_rooms(timeout_s: float = 5.0) -> tuple[GpuRoom, ...]:
    """Free and total memory of each NVIDIA GPU, in nvidia-smi's order."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        out = subprocess.run([smi, *QUERY], capture_output=True, text=True,
                             timeout=timeout_s, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed (%s): GPU memory unknown", exc)
        return ()
    return parse_csv(out)


def parse_csv(text: str) -> tuple[GpuRoom, ...]:
    """``memory.free [MiB], memory.total [MiB]`` then ``1234 MiB, 24576 MiB`` per GPU."""
    rooms = []
    for line in text.strip().splitlines()[1:]:
        try:
            free, total = (int(part.strip().split()[0]) for part in line.split(","))
        except (ValueError, IndexError):
            continue
        rooms.append(GpuRoom(free * MIB, total * MIB))
    return tuple(rooms)
