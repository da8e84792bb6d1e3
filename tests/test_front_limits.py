"""The open-file limit at start (corral.front.limits), in-process: raised to the hard limit,
a refusal keeps it, and the connection cap follows the soft limit in force."""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterator

import pytest

from corral.core.edge import max_connections_for
from corral.front import limits
from corral.front.limits import connection_cap, raise_open_files_limit


@pytest.fixture
def soft_1024() -> Iterator[int]:
    """The soft open-file limit lowered to 1024 (as systemd starts services); restored."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard open-file limit is {hard}: nothing to raise to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_soft_limit_is_raised_to_the_hard_one(soft_1024: int,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Started with soft 1024, the process runs with soft = hard, and says both."""
    caplog.set_level(logging.INFO, "corral.front")
    got = raise_open_files_limit()
    hard = soft_1024
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert (got.soft_before, got.soft, got.hard) == (1024, expected, hard)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == expected
    assert connection_cap(None) == max_connections_for(expected)
    assert any("soft" in r.message and "1024" in r.message for r in caplog.records)


def test_a_refused_raise_keeps_the_limit_and_warns(soft_1024: int,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """When the kernel refuses, the soft limit stays and the cap is derived from it."""
    def refuse(*_: object) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(limits.resource, "setrlimit", refuse)
    caplog.set_level(logging.INFO, "corral.front")
    got = raise_open_files_limit()
    assert got.soft == 1024 and resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 1024
    assert connection_cap(None) == max_connections_for(1024) == 384
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]


def test_a_configured_cap_wins() -> None:
    """--max-connections N is N, whatever the open-file limit."""
    assert connection_cap(7) == 7
