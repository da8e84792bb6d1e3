"""The process's open-file limit: raised at start, and the connection cap derived from it.

systemd starts services with a soft ``RLIMIT_NOFILE`` of 1024 whatever the hard limit is;
HAProxy and nginx raise their own soft limit at start, and so does Corral (``corral.core.edge``
says how far and how many client connections then fit).
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

from corral.core.edge import max_connections_for, nofile_target

log = logging.getLogger("corral.front")

__all__ = ["NofileLimits", "connection_cap", "raise_open_files_limit"]


@dataclass(frozen=True, slots=True)
class NofileLimits:
    soft_before: int
    soft: int
    hard: int


def _show(n: int) -> str:
    return "unlimited" if n == resource.RLIM_INFINITY else str(n)


def raise_open_files_limit() -> NofileLimits:
    """Raise the soft open-file limit to the hard one (log both); a refusal keeps it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = nofile_target(soft, hard, resource.RLIM_INFINITY)
    now = soft
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            now = target
        except (ValueError, OSError) as exc:
            log.warning("open-file limit: could not raise the soft limit from %s to %s: %s",
                        _show(soft), _show(target), exc)
    log.info("open-file limit: soft %s (was %s), hard %s", _show(now), _show(soft),
             _show(hard))
    return NofileLimits(soft, now, hard)


def connection_cap(configured: int | None) -> int:
    """``--max-connections`` as given, else what the soft open-file limit allows."""
    if configured is not None:
        return configured
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max_connections_for(1 << 20 if soft == resource.RLIM_INFINITY else soft)
