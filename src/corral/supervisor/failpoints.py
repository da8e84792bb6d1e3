"""Crash injection for fault tests: ``CORRAL_FAILPOINT=after_stop`` makes the supervisor
SIGKILL itself when it reaches that point of an apply, the way a power cut or OOM kill would.

Points: ``before_<step>`` and ``after_<step>`` for every step of a plan
(:mod:`corral.core.steps`, lower-cased: ``after_stop``, ``after_awaitready``,
``before_persist``, ``after_persist``, ``after_switch``, ...).
Read once at import; costs one comparison per step when unset.
"""

from __future__ import annotations

import os
import signal

_ARMED = frozenset(filter(None, os.environ.get("CORRAL_FAILPOINT", "").split(",")))


def failpoint(step: str) -> None:
    if step in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
