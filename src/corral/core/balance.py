"""What HAProxy's backend should become, given the fleet in etcd. No I/O.

Theory of operation
-------------------
``corral balance`` reads two facts and :func:`plan` turns them into HAProxy Runtime API
commands: the fleet's live registrations (each a :class:`Member`: its address and the
state it should have in HAProxy) and the backend as ``show servers state`` and
``show stat`` describe it (each a :class:`Server`). Servers whose name starts with the
balancer's prefix are its own; every other server is left alone.

- a member without a server is added (dynamic servers start in maintenance), its health
  checks enabled, and set to the state it should have;
- a member whose server differs in address or state is corrected;
- a server of ours whose member is gone (its lease expired) is drained; once it has no
  sessions left, or it has been draining for ``grace`` seconds, it is put in maintenance
  and deleted.

A member asks to be drained (before it applies a rollout revision, see
:mod:`corral.fleet.drain`); :attr:`Plan.drained` names the members whose server is drained
with nothing in flight, which the balancer acknowledges in etcd. The last server serving
is never drained (HAProxy would answer 503 where the member's front door holds requests
while it applies): it stays ready and counts as drained at once. The plan is level-
triggered: it is computed again from fresh facts after every round, so a command that
failed (HAProxy restarted, another balancer was first) is simply planned again.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["Member", "Mode", "Plan", "Server", "all_acked", "endpoint_of", "member_mode",
           "parse_servers_state", "parse_sessions", "plan", "server_name", "server_states"]

DEFAULT_PREFIX = "corral-"
_MAINT_BITS = 0x01 | 0x02 | 0x04 | 0x20 | 0x80  # forced, inherited, configured, DNS, hostname
_DRAIN_BITS = 0x08 | 0x10  # forced, inherited
_WILDCARDS = ("", "0.0.0.0", "::", "*")


class Mode(enum.StrEnum):
    """A server's administrative state, in the Runtime API's words."""

    READY = "ready"
    DRAIN = "drain"
    MAINT = "maint"


@dataclass(frozen=True)
class Member:
    """A live instance as the backend should have it."""

    instance: str
    address: str
    port: int
    mode: Mode


@dataclass(frozen=True)
class Server:
    """A server of the backend as HAProxy reports it."""

    name: str
    address: str
    port: int
    admin: int  # srv_admin_state bits
    sessions: int = 0  # in flight or queued (scur + qcur of show stat)
    up: bool = True  # its health checks pass (srv_op_state 2)

    @property
    def mode(self) -> Mode:
        if self.admin & _MAINT_BITS:
            return Mode.MAINT
        return Mode.DRAIN if self.admin & _DRAIN_BITS else Mode.READY


@dataclass(frozen=True)
class Plan:
    commands: tuple[str, ...]
    drained: frozenset[str]  # members asked to drain whose server carries nothing now
    retiring: Mapping[str, float] = field(default_factory=dict)  # gone server -> since


def server_name(prefix: str, instance: str) -> str:
    """The HAProxy server name of ``instance`` (characters HAProxy refuses become ``_``)."""
    return prefix + re.sub(r"[^A-Za-z0-9_.:-]", "_", instance)


def member_mode(info: Mapping[str, Any], drain_requested: bool) -> Mode:
    """FATAL goes to maintenance; an instance about to apply a revision is drained."""
    if str(info.get("state", "")).upper() == "FATAL":
        return Mode.MAINT
    return Mode.DRAIN if drain_requested else Mode.READY


def _split(addr: str) -> tuple[str, int] | None:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def endpoint_of(info: Mapping[str, Any]) -> tuple[str, int] | None:
    """Where clients reach a registered instance: its front door (``listen``), else
    llama-server's port; a wildcard host is replaced by the supervisor's address, then by
    the machine's name. None if the registration says too little."""
    supervisor = _split(str(info.get("supervisor") or ""))
    fallbacks = [supervisor[0] if supervisor else "", str(info.get("host") or "")]
    listen = _split(str(info.get("listen") or ""))
    if listen is not None:
        host, port = listen
    elif isinstance(info.get("port"), int):
        host, port = "", int(info["port"])
    else:
        return None
    for candidate in [host, *fallbacks]:
        if candidate not in _WILDCARDS:
            return candidate, port
    return None


def plan(members: Mapping[str, Member], servers: Sequence[Server], *, backend: str,
         prefix: str = DEFAULT_PREFIX, retiring: Mapping[str, float] | None = None,
         now: float = 0.0, grace: float = 30.0, check: str = "check") -> Plan:
    """The commands that make ``backend`` match ``members`` (see the module's docstring)."""
    ours = {s.name: s for s in servers if s.name.startswith(prefix)}
    wanted = {server_name(prefix, m.instance): m for m in members.values()}
    commands: list[str] = []
    drained = _spare_the_last(wanted, servers)
    for name, member in sorted(wanted.items()):
        commands += _converge(f"{backend}/{name}", member, ours.get(name), check)
        if member.mode is not Mode.READY and _is_idle(ours.get(name)):
            drained.add(member.instance)
    still: dict[str, float] = {}
    for name, server in sorted(ours.items()):
        if name in wanted:
            continue
        since = (retiring or {}).get(name, now)
        done, steps = _retire(f"{backend}/{name}", server, now - since >= grace)
        commands += steps
        if not done:
            still[name] = since
    return Plan(tuple(commands), frozenset(drained), still)


def _spare_the_last(wanted: dict[str, Member], servers: Sequence[Server]) -> set[str]:
    """Members asked to drain that stay ready, because no other server would be serving:
    their front door holds requests while they apply (as without a balancer), where HAProxy
    would answer 503. They count as drained at once. Changes ``wanted`` in place."""
    serving = {s.name for s in servers if s.mode is Mode.READY and s.up
               and (s.name not in wanted or wanted[s.name].mode is Mode.READY)}
    spared = set()
    for name, member in sorted(wanted.items()):
        if member.mode is Mode.DRAIN and not serving - {name}:
            wanted[name] = replace(member, mode=Mode.READY)
            spared.add(member.instance)
    return spared


def _is_idle(server: Server | None) -> bool:
    return server is None or (server.mode is not Mode.READY and server.sessions == 0)


def _converge(ref: str, member: Member, server: Server | None, check: str) -> list[str]:
    if server is None:
        add = [f"add server {ref} {_addr(member.address)}:{member.port} {check}".rstrip()]
        if check.split()[:1] == ["check"]:
            add.append(f"enable health {ref}")
        if member.mode is not Mode.MAINT:
            add.append(f"set server {ref} state {member.mode.value}")
        return add
    steps = []
    if (server.address, server.port) != (member.address, member.port):
        steps.append(f"set server {ref} addr {member.address} port {member.port}")
    if server.mode is not member.mode:
        steps.append(f"set server {ref} state {member.mode.value}")
    return steps


def _retire(ref: str, server: Server, overdue: bool) -> tuple[bool, list[str]]:
    """Steps for a server whose member is gone; True once it is deleted by them."""
    steps = []
    if server.mode is Mode.READY:
        steps.append(f"set server {ref} state drain")
    if server.sessions and not overdue:
        return False, steps
    if server.sessions:
        steps.append(f"shutdown sessions server {ref}")
    if server.mode is not Mode.MAINT:
        steps.append(f"set server {ref} state maint")
    steps.append(f"del server {ref}")
    return True, steps


def _addr(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def parse_servers_state(text: str, backend: str) -> list[Server]:
    """The servers of ``backend`` in ``show servers state`` output (format version 1)."""
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 19 or line.startswith("#") or fields[1] != backend:
            continue
        port = int(fields[18]) if fields[18].isdigit() else 0
        found.append(Server(fields[3], fields[4], port, int(fields[6]), up=fields[5] == "2"))
    return found


def parse_sessions(csv: str, backend: str) -> dict[str, int]:
    """Sessions in flight or queued per server of ``backend`` in ``show stat`` CSV."""
    lines = csv.splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    header = lines[0][2:].split(",")
    at = {name: i for i, name in enumerate(header)}
    found = {}
    for line in lines[1:]:
        row = line.split(",")
        if len(row) < len(at) - 1 or row[at["pxname"]] != backend:
            continue
        if row[at["svname"]] in ("FRONTEND", "BACKEND"):
            continue
        found[row[at["svname"]]] = sum(int(row[at[k]] or 0) for k in ("scur", "qcur"))
    return found


def server_states(members: Mapping[str, Member], servers: Sequence[Server],
                  prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    """Instance -> its server's state in words (``ready``, ``drain (down)``...), for
    ``corral fleet``."""
    by_name = {s.name: s for s in servers}
    found = {}
    for instance in members:
        server = by_name.get(server_name(prefix, instance))
        if server is not None:
            found[instance] = server.mode.value + ("" if server.up else " (down)")
    return found


def all_acked(balancers: frozenset[str], acks: Mapping[str, str], request: int) -> bool:
    """Whether every live balancer acknowledged the drain request made at ``request`` (its
    etcd create_revision; an older acknowledgement is of an older request)."""
    return all(acks.get(b) == str(request) for b in balancers)
