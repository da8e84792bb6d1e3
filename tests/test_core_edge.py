"""The edge's rules (corral.core.edge): the connection cap, the open-file limit, expiry."""

from __future__ import annotations

import pytest

from corral.core.edge import (
    FD_RESERVE,
    Admission,
    ConnectionTable,
    admit,
    max_connections_for,
    nofile_target,
    sweep_interval,
)

INF = -1  # RLIM_INFINITY on Linux


@pytest.mark.parametrize(("open_", "idle", "cap", "expected"), [
    (0, 0, 10, Admission.ACCEPT),
    (9, 9, 10, Admission.ACCEPT),
    (10, 1, 10, Admission.EVICT_IDLE),
    (10, 0, 10, Admission.REJECT),
    (12, 0, 10, Admission.REJECT),
])
def test_admission(open_: int, idle: int, cap: int, expected: Admission) -> None:
    """Below the cap accept; at it take an idle connection's place, or refuse with none."""
    assert admit(open_, idle, cap) is expected


@pytest.mark.parametrize(("soft", "expected"), [
    (1024, (1024 - FD_RESERVE) // 2), (20000, (20000 - FD_RESERVE) // 2), (65536, 32640),
    (256, 16), (0, 16),
])
def test_max_connections_from_the_open_file_limit(soft: int, expected: int) -> None:
    """Two descriptors per proxied request after the reserve; never fewer than 16."""
    assert max_connections_for(soft) == expected


@pytest.mark.parametrize(("soft", "hard", "expected"), [
    (1024, 20000, 20000), (20000, 20000, 20000), (4096, 1024, 4096),
    (1024, INF, 1 << 20), (INF, INF, INF), (2 << 20, INF, 2 << 20),
])
def test_nofile_target(soft: int, hard: int, expected: int) -> None:
    """The soft limit goes up to the hard one (a ceiling when unlimited), never down."""
    assert nofile_target(soft, hard, INF) == expected


@pytest.mark.parametrize(("idle", "header", "expected"), [
    (60, 10, 1.0), (2, 10, 0.5), (0.02, 10, 0.01), (0, 0, None), (0, 2, 0.5), (60, 0, 1.0),
])
def test_sweep_interval(idle: float, header: float, expected: float | None) -> None:
    """A quarter of the shorter timeout that is on, within 10 ms .. 1 s."""
    assert sweep_interval(idle, header) == expected


def test_idle_connections_expire_oldest_first_and_a_new_idle_spell_restarts() -> None:
    """Idle time counts from the last time a connection went idle, in that order."""
    t: ConnectionTable[str] = ConnectionTable(10)
    for i, name in enumerate("abc"):
        t.admit(name, float(i))
    t.head_began("a", 3.0)
    t.head_ended("a")
    t.went_idle("a", 5.0)   # a: idle again since 5, now the newest
    assert t.expired_idle(61.5, 60) == ["b"]
    assert t.expired_idle(70.0, 60) == ["c", "a"]
    assert t.open == set() and t.idle_count == 0


def test_heads_expire_from_their_first_byte_and_busy_ones_never() -> None:
    """A head not whole in time is reported; a whole one (busy) is no longer timed."""
    t: ConnectionTable[str] = ConnectionTable(10)
    t.admit("slow", 0.0)
    t.admit("done", 0.0)
    t.head_began("slow", 1.0)
    t.head_began("done", 1.5)
    t.head_ended("done")
    assert t.expired_heads(10.9, 10) == []
    assert t.expired_heads(11.0, 10) == ["slow"]
    assert t.expired_idle(1000.0, 60) == []   # neither is idle: one in its head, one busy
    assert t.expired_heads(11.0, 0) == []     # 0: no header timeout


def test_at_the_cap_the_longest_idle_makes_room() -> None:
    """The cap holds: the oldest idle connection is evicted, busy ones never are."""
    t: ConnectionTable[str] = ConnectionTable(2)
    t.admit("busy", 0.0)
    t.head_began("busy", 0.1)
    t.head_ended("busy")
    t.admit("idle", 1.0)
    assert t.admit("new", 2.0) == (Admission.EVICT_IDLE, "idle")
    assert t.open == {"busy", "new"}
    t.head_began("new", 2.1)
    assert t.admit("third", 3.0) == (Admission.REJECT, None)
    assert t.open == {"busy", "new"}
