"""Values that more than one module must agree on, defined once.

The supervisor and its client commands must meet at the same default address and read the
same token variable; the etcd registration key, the fleet report and the ``applied_by``
stamp must name an instance the same way.
"""

from __future__ import annotations

import os
import socket

__all__ = ["SUPERVISOR_ADDR", "TOKEN_ENV", "instance_id", "token_from_env"]

SUPERVISOR_ADDR = "127.0.0.1:8084"
"""Where the management API listens, and where the client commands look for it."""

TOKEN_ENV = "CORRAL_API_TOKEN"
"""The environment variable that holds the API token when ``--api-token`` is not given."""


def token_from_env(given: str | None) -> str | None:
    """The token given on the command line, else ``$CORRAL_API_TOKEN``; empty means none."""
    return given or os.environ.get(TOKEN_ENV) or None


def instance_id() -> str:
    """This process as ``host-pid``: unique per live supervisor, readable in ``corral fleet``.

    A dash, not a colon: the id is an etcd key segment and may end up in file names and
    URLs, where ``:`` needs quoting. Hostnames may contain dashes; split on the last one.
    """
    return f"{socket.gethostname()}-{os.getpid()}"
