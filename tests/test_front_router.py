"""The router's decisions, without sockets: modes, the held queue, parked retries, counts."""

from __future__ import annotations

import pytest

from corral.front.model import Upstream
from corral.front.router import Held, Mode, Rejected, Router

A = Upstream("127.0.0.1", 9001, 1)
B = Upstream("127.0.0.1", 9002, 2)


def test_it_starts_holding_and_queues_up_to_max_held() -> None:
    """A new router holds, queues up to max_held, and rejects the next as held_overflow."""
    r: Router[str] = Router(max_held=2)
    assert r.mode is Mode.HOLDING
    assert [r.admit("a"), r.admit("b")] == [Held.QUEUED, Held.QUEUED]
    third = r.admit("c")
    assert isinstance(third, Rejected) and third.cause == "held_overflow"
    assert r.held_now == 2 and r.held_total == 2


def test_route_to_releases_everything_in_arrival_order() -> None:
    """route_to releases every held request in arrival order; later ones go straight there."""
    r: Router[str] = Router(max_held=10)
    for item in "abc":
        r.admit(item)
    assert r.route_to(A).release == ["a", "b", "c"]
    assert r.admit("d") == A and r.held_now == 0 and r.released_total == 3


def test_refuse_rejects_the_waiting_and_the_new() -> None:
    """refuse rejects the waiting and new requests with its reason until route_to."""
    r: Router[str] = Router(max_held=10)
    r.admit("a")
    assert r.refuse("FATAL").reject == ["a"]
    assert r.admit("b") == Rejected("refused", "FATAL")
    assert r.route_to(A).release == [] and r.admit("c") == A


@pytest.mark.parametrize(("mode", "expected"), [
    ("holding", Held.QUEUED),        # front of the queue
    ("routing_same", Held.PARKED),   # the controller has not noticed the crash yet
    ("routing_other", B),            # it has, and switched
    ("refusing", Rejected("refused", "stop")),
])
def test_a_retry_goes_where_the_mode_says(mode: str, expected: object) -> None:
    """A retry is queued first when holding, parked on the failed upstream, sent on, or refused."""
    r: Router[str] = Router(max_held=1)
    r.route_to(A)
    if mode == "holding":
        r.hold()
        r.admit("queued-first")
    elif mode == "routing_other":
        r.route_to(B)
    elif mode == "refusing":
        r.refuse("stop")
    assert r.readmit("retry", failed=A) == expected
    if mode == "holding":   # over max_held, and ahead of the one queued before it
        assert r.route_to(B).release == ["retry", "queued-first"]


def test_parked_retries_move_with_the_switches() -> None:
    """Parked retries join the queue on hold and leave with route_to; unpark sends them once."""
    r: Router[str] = Router(max_held=10)
    r.route_to(A)
    r.readmit("x", failed=A)
    assert r.hold() == ["x"] and r.waiting() == ["x"]
    r.admit("y")
    assert r.route_to(B).release == ["x", "y"]
    r.readmit("z", failed=B)
    assert r.unpark("z") == B and r.unpark("z") is None


def test_withdraw_forgets_a_waiting_request() -> None:
    """withdraw removes a waiting request once, so route_to releases only the others."""
    r: Router[str] = Router(max_held=10)
    r.admit("a")
    r.admit("b")
    assert r.withdraw("a") and not r.withdraw("a")
    assert r.route_to(A).release == ["b"]


def test_in_flight_counts_per_upstream() -> None:
    """In-flight counts go up per upstream on started, down on finished, with a total."""
    r: Router[str] = Router(max_held=10)
    r.started(A)
    r.started(A)
    r.started(B)
    assert (r.in_flight(A), r.in_flight(B), r.in_flight()) == (2, 1, 3)
    assert r.finished(A) == 1 and r.finished(A) == 0 and r.in_flight(A) == 0
