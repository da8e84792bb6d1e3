"""The audit log (corral.observe.audit): one JSON line per change outcome, start-up and
refusal; the before -> after diff; rotation by size; reading the newest back across files."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.core.args import LlamaConfig
from corral.observe.audit import AuditLog, config_from_json, diff
from corral.observe.events import EventBus
from corral.supervisor.changes import config_json
from tests.fakes import config


def lines_of(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_change_event_becomes_one_line_with_the_diff(tmp_path: Path) -> None:
    """Every field the history shows is there; the diff names only what changed."""
    bus = EventBus()
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.listen_to(bus)
    before = LlamaConfig("/bin/a", (("--model", "a.gguf"), ("-np", "1"), ("--flash", True)),
                         (("CUDA_VISIBLE_DEVICES", "0"),))
    after = LlamaConfig("/bin/b", (("--model", "a.gguf"), ("-np", "4"), ("-c", "4096")),
                        (("CUDA_VISIBLE_DEVICES", "1"),))
    bus.emit("state", **{"from": "RUNNING", "to": "APPLYING", "error": None})  # not a change
    bus.emit("change", change="c7", source="api", client="10.0.0.9", outcome="applied",
             error=None, restarted=True, strategy="stop-first", duration_s=1.25,
             before=config_json(before), after=config_json(after))
    (entry,) = lines_of(audit.path)
    assert entry["kind"] == "change" and entry["id"] == "c7"
    assert (entry["source"], entry["client"], entry["outcome"]) == ("api", "10.0.0.9", "applied")
    assert (entry["duration_s"], entry["strategy"], entry["restarted"]) == (1.25, "stop-first",
                                                                            True)
    assert entry["diff"] == {"binary": ["/bin/a", "/bin/b"], "-np": ["1", "4"],
                             "--flash": [True, None], "-c": [None, "4096"],
                             "env:CUDA_VISIBLE_DEVICES": ["0", "1"]}
    assert isinstance(entry["time"], float)
    assert config_from_json(entry["before"]) == before  # kept whole: revertible later


def test_refusals_and_start_up_are_recorded(tmp_path: Path) -> None:
    """A change refused at the API and the start-up each leave a line."""
    bus = EventBus()
    audit = AuditLog(tmp_path / "audit.jsonl", clock=lambda: 123.0)
    audit.listen_to(bus)
    audit.refused("127.0.0.1", "unknown llama-server flag '--nope'", {"--nope": 1})
    bus.emit("start-up", source="start-up", outcome="applied", error=None,
             before=None, after=config_json(config()))
    refused, started = lines_of(audit.path)
    assert refused == {"time": 123.0, "kind": "refused", "id": None, "source": "api",
                       "client": "127.0.0.1", "outcome": "refused",
                       "error": "unknown llama-server flag '--nope'", "duration_s": 0.0,
                       "strategy": None, "restarted": False, "diff": {},
                       "request": {"--nope": 1}}
    assert started["source"] == "start-up" and started["after"] == config_json(config())


def test_rotation_by_size_keeps_n_files_and_last_reads_across_them(tmp_path: Path) -> None:
    """Past max_bytes the file rotates to .1, .2, ...; the oldest beyond keep is deleted;
    last(n) reads the newest n across files, newest first."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=400, keep=2)
    for i in range(40):
        audit.write({"n": i, "pad": "x" * 40})
    files = audit.files()
    assert files == [path, tmp_path / "audit.jsonl.1", tmp_path / "audit.jsonl.2"]
    assert not (tmp_path / "audit.jsonl.3").exists()
    assert all(p.stat().st_size <= 400 for p in files)
    kept = [e["n"] for e in audit.entries()]
    assert kept == list(range(39, 39 - len(kept), -1))  # contiguous, newest first
    assert len(kept) < 40  # something was dropped with the oldest file
    assert [e["n"] for e in audit.last(10)] == list(range(39, 29, -1))
    first_file = len(lines_of(path))
    assert first_file < 10  # so last(10) really crossed into path.1
    assert audit.last(0) == []


def test_last_reads_long_files_from_the_end_block_by_block(tmp_path: Path) -> None:
    """Lines that straddle read blocks come back whole; a torn last line is skipped."""
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, call_later=lambda delay, sync: None)  # one fsync, at close()
    for i in range(3000):
        audit.write({"n": i, "pad": "y" * (i % 97)})
    audit.close()
    with open(path, "ab") as f:
        f.write(b'{"n": "torn')  # a writer killed mid-line
    assert [e["n"] for e in audit.last(2500)] == list(range(2999, 499, -1))


def test_an_existing_file_is_appended_and_its_size_counted(tmp_path: Path) -> None:
    """A restarted supervisor appends to its predecessor's log and rotates at the limit."""
    path = tmp_path / "audit.jsonl"
    AuditLog(path).write({"n": 0})
    audit = AuditLog(path, max_bytes=30)
    audit.write({"n": 1, "pad": "z" * 10})
    assert [e["n"] for e in audit.last(5)] == [1, 0]
    assert lines_of(tmp_path / "audit.jsonl.1") == [{"n": 0}]


def test_find_returns_the_newest_outcome_of_a_change(tmp_path: Path) -> None:
    """The newest entry for an id wins."""
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.write({"kind": "change", "id": "c1", "outcome": "rejected"})
    audit.write({"kind": "change", "id": "c1", "outcome": "applied"})
    audit.write({"kind": "refused", "id": None})
    found = audit.find("c1")
    assert found is not None and found["outcome"] == "applied"
    assert audit.find("c2") is None


def test_an_unwritable_log_does_not_raise(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """The supervisor goes on when its state directory is not writable."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    audit = AuditLog(blocker / "audit.jsonl")  # a directory that is a file
    audit.write({"n": 1})
    assert "cannot write the audit log" in caplog.text
    assert audit.last(1) == []


def test_diff_of_identical_configs_is_empty() -> None:
    """The diff of a config with itself, or from nothing, is empty."""
    view = config_json(config())
    assert diff(view, view) == {}
    assert diff(None, view) == {}


class FsyncSpy:
    """Counts the fsyncs of files and of directories (the real fsync still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.files = 0
        self.dirs = 0
        self.on_file: Callable[[], object] = lambda: None
        real = os.fsync

        def spy(fd: int) -> None:
            real(fd)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                self.dirs += 1
            else:
                self.files += 1
                self.on_file()

        monkeypatch.setattr(os, "fsync", spy)


def test_every_line_is_fsynced_within_a_second_of_being_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first line is fsynced at once; a burst after it waits for one deferred fsync due
    at most 1 s after the burst's first line (the loss window a power cut has); close()
    fsyncs what is left."""
    spy = FsyncSpy(monkeypatch)
    now = [100.0]
    timers: list[tuple[float, Callable[[], None]]] = []
    audit = AuditLog(tmp_path / "audit.jsonl", monotonic=lambda: now[0],
                     call_later=lambda delay, cb: timers.append((now[0] + delay, cb)))
    audit.write({"n": 0})
    assert (spy.files, timers) == (1, [])
    for i in range(1, 50):
        now[0] += 0.01
        audit.write({"n": i})
    assert spy.files == 1 and len(timers) == 1  # 49 lines, one fsync scheduled
    due, sync = timers.pop()
    assert due <= 100.01 + 1.0
    now[0] = due
    sync()
    assert spy.files == 2
    now[0] += 1.0  # a quiet second: the next line goes to disk at once again
    audit.write({"n": 50})
    assert (spy.files, timers) == (3, [])
    audit.write({"n": 51})
    assert spy.files == 3 and len(timers) == 1
    audit.close()
    assert spy.files == 4
    timers.pop()[1]()  # the timer firing after close() does nothing more
    assert spy.files == 4
    assert [e["n"] for e in audit.last(100)] == list(range(51, -1, -1))


def test_creation_and_rotation_fsync_the_directory(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The new file's name and the rotation's renames are made durable too."""
    spy = FsyncSpy(monkeypatch)
    audit = AuditLog(tmp_path / "audit.jsonl", max_bytes=120)  # two lines
    audit.write({"n": 0, "pad": "x" * 40})
    assert spy.dirs == 1  # created
    audit.write({"n": 1, "pad": "x" * 40})
    assert spy.dirs == 1
    audit.write({"n": 2, "pad": "x" * 40})  # rotates
    assert (tmp_path / "audit.jsonl.1").exists() and spy.dirs == 3  # renamed, created


async def test_in_the_event_loop_the_deferred_fsync_runs_on_a_timer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a running loop nothing else has to call anything: the loop's timer fsyncs the
    burst after fsync_every_s."""
    spy = FsyncSpy(monkeypatch)
    audit = AuditLog(tmp_path / "audit.jsonl", fsync_every_s=0.05)
    for i in range(20):
        audit.write({"n": i})
    assert spy.files == 1
    synced = asyncio.Event()
    spy.on_file = synced.set
    await asyncio.wait_for(synced.wait(), 5)
    assert spy.files == 2
    audit.close()
    assert spy.files == 2  # nothing was left to sync
