"""Host memory: MemAvailable, lowered by a cgroup limit (v2 or v1); GPUs from nvidia-smi."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from corral.core.fit import MIB
from corral.sense.gpu import gpu_rooms, parse_csv
from corral.sense.memory import MemorySource
from tests.sense_helpers import fake_memory


@pytest.mark.parametrize(("available", "room", "version", "expected"), [
    (20000, None, 2, 20000),  # no limit: MemAvailable
    (20000, 3000, 2, 3000),  # a container's limit is lower
    (2000, 3000, 2, 2000),  # MemAvailable is lower
    (20000, 3000, 1, 3000),  # cgroup v1
    (20000, None, 1, 20000),  # v1 "unlimited" is a huge number
])
def test_available_is_the_lower_of_host_and_cgroup(tmp_path: Path, available: int,
                                                   room: int | None, version: int,
                                                   expected: int) -> None:
    """MemAvailable, or the cgroup's limit minus its usage when that is lower."""
    assert fake_memory(tmp_path, available, room, version).available() == expected * MIB


def test_missing_files_mean_unknown(tmp_path: Path) -> None:
    """Nothing readable: None, not zero."""
    source = MemorySource(tmp_path / "no", tmp_path / "no", tmp_path / "no")
    assert source.available() is None


def test_the_real_machine_has_a_figure() -> None:
    """On this Linux box the default source reads something."""
    assert (MemorySource().available() or 0) > 0


def test_nvidia_smi_csv_is_parsed() -> None:
    """nvidia-smi's CSV: one row per GPU in MiB; junk rows skipped."""
    rooms = parse_csv("memory.free [MiB], memory.total [MiB]\n1234 MiB, 24576 MiB\n"
                      "N/A, N/A\n500 MiB, 8192 MiB\n")
    assert [(r.free_bytes // MIB, r.total_bytes // MIB) for r in rooms] == [(1234, 24576),
                                                                            (500, 8192)]


def test_a_fake_nvidia_smi_on_path_is_asked(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With nvidia-smi on PATH, its answer to the memory query is used."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"""#!{sys.executable}
import sys
assert sys.argv[1:] == ["--query-gpu=memory.free,memory.total", "--format=csv"], sys.argv
print("memory.free [MiB], memory.total [MiB]")
print("20000 MiB, 24576 MiB")
""")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert [r.free_bytes // MIB for r in gpu_rooms()] == [20000]


def test_no_nvidia_smi_means_no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without nvidia-smi on PATH there are no GPUs to count."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_rooms() == ()
