"""Crash injection for fault tests: ``CORRAL_FAILPOINT=after_stop_old`` makes the supervisor
SIGKILL itself when it reaches that step, the way a power cut or OOM kill would.

Steps: ``after_stop_old``, ``after_start_new``, ``before_persist``, ``after_persist``.
Read once at import; costs one comparison per step when unset.
"""

from __future__ import annotations

import os
import signal

_ARMED = frozenset(filter(None, os.environ.get("CORRAL_FAILPOINT", "").split(",")))


def failpoint(step: str) -> None:
    if step in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
