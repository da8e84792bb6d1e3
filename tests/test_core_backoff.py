"""corral.core.backoff: restart delays and the consecutive-failure count."""

from __future__ import annotations

import pytest

from corral.core.backoff import BackoffPolicy, StartHistory

DEFAULT = BackoffPolicy()
LONG = BackoffPolicy(max_failures=100)


@pytest.mark.parametrize(
    ("policy", "failures", "delay"),
    [
        (DEFAULT, -1, 0.0),
        (DEFAULT, 0, 0.0),
        (DEFAULT, 1, 0.5),
        (DEFAULT, 2, 1.0),
        (DEFAULT, 3, 2.0),
        (DEFAULT, 4, 4.0),
        (DEFAULT, 5, None),  # max_failures: give up (FATAL)
        (DEFAULT, 6, None),
        (LONG, 5, 8.0),
        (LONG, 6, 16.0),
        (LONG, 7, 30.0),  # 32 capped
        (LONG, 50, 30.0),
        (LONG, 99, 30.0),
        (LONG, 100, None),
        (BackoffPolicy(max_failures=1), 0, 0.0),
        (BackoffPolicy(max_failures=1), 1, None),
        (BackoffPolicy(initial_s=1, factor=3, cap_s=10, max_failures=9), 3, 9.0),
        (BackoffPolicy(initial_s=1, factor=3, cap_s=10, max_failures=9), 4, 10.0),
    ],
)
def test_delay_after(policy: BackoffPolicy, failures: int, delay: float | None) -> None:
    """The delay after N consecutive failures, the cap, and giving up at max_failures."""
    assert policy.delay_after(failures) == delay


def test_defaults_match_the_architecture() -> None:
    """The default schedule is 0.5 s doubling to 30 s, as documented."""
    assert (DEFAULT.initial_s, DEFAULT.factor, DEFAULT.cap_s) == (0.5, 2.0, 30.0)


def test_delays_never_shrink_until_giving_up() -> None:
    """Delays never shrink as failures add up, and stop at the cap."""
    delays = [LONG.delay_after(n) for n in range(100)]
    assert all(isinstance(d, float) for d in delays)
    assert delays == sorted(delays)
    assert max(delays) == 30.0


@pytest.mark.parametrize(
    ("events", "counts"),
    [
        ("", []),
        ("fff", [1, 2, 3]),
        ("ffs", [1, 2, 0]),
        ("ffsf", [1, 2, 0, 1]),
        ("ss", [0, 0]),
        ("sfsf", [0, 1, 0, 1]),
    ],
)
def test_start_history(events: str, counts: list[int]) -> None:
    """failed() counts up and returns the new count; succeeded() resets it to 0."""
    history = StartHistory()
    returned, after = [], []
    for event in events:
        if event == "f":
            returned.append(history.failed())
        else:
            history.succeeded()
        after.append(history.consecutive_failures)
    assert after == counts
    assert returned == [n for n, e in zip(counts, events, strict=True) if e == "f"]


def test_history_drives_the_policy_to_fatal() -> None:
    """Failures counted by the history reach FATAL; one success starts afresh."""
    history, policy = StartHistory(), BackoffPolicy(max_failures=3)
    assert [policy.delay_after(history.failed()) for _ in range(4)] == [0.5, 1.0, None, None]
    history.succeeded()  # a new successful apply clears FATAL
    assert policy.delay_after(history.consecutive_failures) == 0.0
