"""Socket activation: the listening sockets systemd hands over (``LISTEN_FDS``).

A ``corral.socket`` unit keeps the front door's port open while the supervisor restarts:
:func:`inherited_listener` picks the inherited socket that matches ``--listen`` (or the
only one), so clients never see the port closed.

**Socket activation.** ``sd_listen_fds(3)``: when ``$LISTEN_PID`` is this process, fds
``3 .. 3 + $LISTEN_FDS - 1`` are sockets systemd (``corral.socket``) opened and keeps open.
The front door accepts on such a socket, so a client that connects while Corral starts, or
restarts, waits in the kernel's backlog instead of being refused. The variables are unset
once read so children do not see them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import MutableMapping, Sequence

__all__ = ["SD_LISTEN_FDS_START", "inherited_listener", "listen_fds", "listen_fds_with_names"]

log = logging.getLogger("corral.systemd")

SD_LISTEN_FDS_START = 3


def listen_fds_with_names(unset_environment: bool = True,
                          env: MutableMapping[str, str] | None = None
                          ) -> list[tuple[socket.socket, str]]:
    """``sd_listen_fds_with_names(3)``: the sockets systemd passed this process, named.

    Nothing unless $LISTEN_PID is this process. The fds become close-on-exec; with
    ``unset_environment`` the LISTEN_* variables go, so a second call finds nothing.
    """
    env = os.environ if env is None else env
    pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
    if not pid or not count:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        log.warning("LISTEN_PID=%r / LISTEN_FDS=%r are not numbers: no inherited sockets",
                    pid, count)
        return []
    labels = names.split(":") if names else []
    if len(labels) != n:
        labels = ["unknown"] * n
    found: list[tuple[socket.socket, str]] = []
    for fd, label in zip(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n), labels,
                         strict=True):
        try:
            os.set_inheritable(fd, False)
            found.append((socket.socket(fileno=fd), label))
        except OSError as exc:
            log.warning("inherited fd %d (%s) is not a usable socket: %s", fd, label, exc)
    return found


def listen_fds(unset_environment: bool = True,
               env: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """``sd_listen_fds(3)``: the sockets systemd passed this process (fd 3 on)."""
    return [sock for sock, _ in listen_fds_with_names(unset_environment, env)]


def _is_tcp_listener(sock: socket.socket) -> bool:
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        return False
    return (sock.family in (socket.AF_INET, socket.AF_INET6)
            and sock.type == socket.SOCK_STREAM and bool(listening))


def _host_matches(wanted: str, bound: str) -> bool:
    def norm(host: str) -> str:
        host = host.strip("[]")
        if host.startswith("::ffff:"):
            host = host[len("::ffff:"):]
        if host == "localhost":
            return "127.0.0.1"
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            return host

    w, b = norm(wanted), norm(bound)
    return w == b or w in ("", "0.0.0.0", "::") or b in ("0.0.0.0", "::")


def _matches(addr: str | None, sock: socket.socket) -> bool:
    if not addr:
        return False
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        return False
    bound_host, bound_port = sock.getsockname()[:2]
    return int(port) == bound_port and _host_matches(host, bound_host)


def _label(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def inherited_listener(addr: str | None,
                       sockets: Sequence[socket.socket] | None = None) -> socket.socket | None:
    """The TCP listening socket systemd passed for the front door, or None.

    The one bound to ``addr`` (``--listen``; a wildcard on either side matches) if there
    is one, else the first TCP listener (with a warning when ``addr`` says otherwise). The
    others are closed here (systemd keeps its own copies). The socket is made
    non-inheritable: llama-server must not hold it.
    """
    candidates = listen_fds() if sockets is None else list(sockets)
    tcp = [s for s in candidates if _is_tcp_listener(s)]
    chosen = next((s for s in tcp if _matches(addr, s)), tcp[0] if tcp else None)
    for other in candidates:
        if other is not chosen:
            log.info("ignoring an inherited socket that is not the front door's (%s)",
                     _label(other) if other.family != socket.AF_UNIX else "unix")
            with contextlib.suppress(OSError):
                other.close()
    if chosen is None:
        if candidates:
            log.warning("none of the %d socket(s) systemd passed is a TCP listener: "
                        "binding --listen %s instead", len(candidates), addr)
        return None
    chosen.set_inheritable(False)
    if addr and not _matches(addr, chosen):
        log.warning("the socket systemd passed listens on %s, not on --listen %s: "
                    "using it", _label(chosen), addr)
    else:
        log.info("front door on the socket systemd passed (%s)", _label(chosen))
    return chosen
