"""The balancer's pure core: from registrations and HAProxy's backend to Runtime API commands."""

from __future__ import annotations

import pytest

from corral.core.balance import (
    Member,
    Mode,
    Server,
    all_acked,
    endpoint_of,
    member_mode,
    parse_servers_state,
    parse_sessions,
    plan,
    server_name,
)

BK = "bk"
READY, DRAIN, MAINT = 0, 8, 1


def member(i: str, mode: Mode = Mode.READY, port: int = 8000) -> dict[str, Member]:
    return {i: Member(i, "10.0.0.1", port, mode)}


def server(i: str, admin: int = READY, sessions: int = 0, port: int = 8000,
           up: bool = True) -> Server:
    return Server(server_name("corral-", i), "10.0.0.1", port, admin, sessions, up)


@pytest.mark.parametrize(("members", "servers", "commands"), [
    # a new member: added (in maintenance, as HAProxy adds them), checked, made ready
    (member("a"), [], ["add server bk/corral-a 10.0.0.1:8000 check",
                       "enable health bk/corral-a", "set server bk/corral-a state ready"]),
    # a new FATAL member is added and stays in maintenance
    (member("a", Mode.MAINT), [], ["add server bk/corral-a 10.0.0.1:8000 check",
                                   "enable health bk/corral-a"]),
    # in sync: nothing to do
    (member("a"), [server("a")], []),
    # asked to drain, another server serving
    (member("a", Mode.DRAIN) | member("b"), [server("a"), server("b")],
     ["set server bk/corral-a state drain"]),
    # asked to drain, the last one serving: stays ready (its front door holds, not a 503)
    (member("a", Mode.DRAIN), [server("a")], []),
    (member("a", Mode.DRAIN) | member("b"), [server("a"), server("b", up=False)], []),
    (member("a", Mode.DRAIN) | member("b", Mode.DRAIN), [server("a"), server("b")], []),
    # ... unless a server it did not add serves
    (member("a", Mode.DRAIN), [server("a"), Server("static1", "10.0.0.9", 80, READY)],
     ["set server bk/corral-a state drain"]),
    # drained, apply over: ready again
    (member("a"), [server("a", DRAIN)], ["set server bk/corral-a state ready"]),
    # FATAL: maintenance
    (member("a", Mode.MAINT), [server("a")], ["set server bk/corral-a state maint"]),
    # moved to another port
    (member("a", port=9000), [server("a")], ["set server bk/corral-a addr 10.0.0.1 port 9000"]),
    # gone and idle: drained, put in maintenance and deleted in one round
    ({}, [server("a")], ["set server bk/corral-a state drain",
                         "set server bk/corral-a state maint", "del server bk/corral-a"]),
    # gone with requests in flight: drained only, deleted later
    ({}, [server("a", sessions=2)], ["set server bk/corral-a state drain"]),
    ({}, [server("a", DRAIN, sessions=2)], []),
    # gone and already in maintenance: deleted
    ({}, [server("a", MAINT)], ["del server bk/corral-a"]),
    # a server it did not add is left alone, in every state
    ({}, [Server("static1", "10.0.0.9", 80, READY, 3)], []),
    ({}, [Server("static1", "10.0.0.9", 80, MAINT)], []),
])
def test_plan_table(members: dict[str, Member], servers: list[Server],
                    commands: list[str]) -> None:
    """Each situation of a member and its server gives exactly these commands."""
    assert list(plan(members, servers, backend=BK).commands) == commands


def test_gone_server_is_cut_after_the_grace() -> None:
    """A gone server's sessions are waited for up to ``grace`` seconds, then cut."""
    first = plan({}, [server("a", DRAIN, 1)], backend=BK, now=100.0, grace=5.0)
    assert first.retiring == {"corral-a": 100.0}
    waiting = plan({}, [server("a", DRAIN, 1)], backend=BK, retiring=first.retiring,
                   now=104.0, grace=5.0)
    assert waiting.commands == () and waiting.retiring == {"corral-a": 100.0}
    cut = plan({}, [server("a", DRAIN, 1)], backend=BK, retiring=first.retiring, now=105.0,
               grace=5.0)
    assert cut.commands == ("shutdown sessions server bk/corral-a",
                            "set server bk/corral-a state maint", "del server bk/corral-a")
    assert cut.retiring == {}


@pytest.mark.parametrize(("mode", "srv", "drained"), [
    (Mode.DRAIN, None, True),  # no server yet: nothing can be in flight
    (Mode.DRAIN, server("a"), False),  # still ready in HAProxy
    (Mode.DRAIN, server("a", DRAIN, 1), False),  # draining, a request in flight
    (Mode.DRAIN, server("a", DRAIN, 0), True),
    (Mode.MAINT, server("a", MAINT, 0), True),
    (Mode.READY, server("a", READY, 0), False),  # nobody asked
])
def test_drained_when_nothing_in_flight(mode: Mode, srv: Server | None, drained: bool) -> None:
    """A member asked to drain (another one serving) is drained once its server takes no
    new requests and has none in flight."""
    p = plan(member("a", mode) | member("b"), [server("b"), *([srv] if srv else [])],
             backend=BK)
    assert ("a" in p.drained) is drained


def test_the_last_one_serving_counts_as_drained_at_once() -> None:
    """A fleet of one is not drained (HAProxy would answer 503) and may apply at once."""
    assert plan(member("a", Mode.DRAIN), [server("a")], backend=BK).drained == {"a"}


def test_member_mode() -> None:
    """FATAL goes to maintenance whatever else; a drain request drains; the rest is ready."""
    assert member_mode({"state": "FATAL"}, True) is Mode.MAINT
    assert member_mode({"state": "RUNNING"}, True) is Mode.DRAIN
    assert member_mode({"state": "APPLYING"}, False) is Mode.READY


@pytest.mark.parametrize(("info", "endpoint"), [
    ({"listen": "10.1.1.1:8080", "port": 41000}, ("10.1.1.1", 8080)),
    ({"listen": "0.0.0.0:8080", "supervisor": "10.1.1.2:8084"}, ("10.1.1.2", 8080)),
    ({"listen": "[::]:8080", "supervisor": "0.0.0.0:8084", "host": "gpu3"}, ("gpu3", 8080)),
    ({"listen": None, "port": 8081, "supervisor": "10.1.1.2:8084"}, ("10.1.1.2", 8081)),
    ({"listen": "[fd00::1]:8080"}, ("fd00::1", 8080)),
    ({"supervisor": "10.1.1.2:8084"}, None),
])
def test_endpoint_of(info: dict[str, object], endpoint: tuple[str, int] | None) -> None:
    """Clients go to the front door, else llama-server's port; wildcards become the
    supervisor's address or the host's name."""
    assert endpoint_of(info) == endpoint


def test_server_names_are_what_haproxy_accepts() -> None:
    """Characters HAProxy refuses in a server name become underscores."""
    assert server_name("corral-", "gpu 3/x-12") == "corral-gpu_3_x-12"


def test_ipv6_address_in_add_server() -> None:
    """An IPv6 address is bracketed in ``add server``."""
    p = plan({"a": Member("a", "::1", 8000, Mode.READY)}, [], backend=BK)
    assert p.commands[0] == "add server bk/corral-a [::1]:8000 check"


STATE = """1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port
3 bk 1 corral-a 127.0.0.1 2 8 1 1 0 1 0 2 6 0 0 0 - 18802 - 0 0 - - 0
4 other 1 x 127.0.0.1 2 0 1 1 0 1 0 2 6 0 0 0 - 18803 - 0 0 - - 0
"""  # noqa: E501  (HAProxy 2.6's own output)

STAT = """# pxname,svname,qcur,qmax,scur,smax
bk,corral-a,1,0,2,4
bk,BACKEND,0,0,2,4
"""


def test_parse_haproxy_output() -> None:
    """``show servers state`` and ``show stat`` as HAProxy 2.6 prints them."""
    assert parse_servers_state(STATE, "bk") == [Server("corral-a", "127.0.0.1", 18802, 8)]
    assert parse_servers_state(STATE, "bk")[0].mode is Mode.DRAIN
    assert parse_sessions(STAT, "bk") == {"corral-a": 3}
    assert parse_sessions("Unknown command\n", "bk") == {}


def test_all_acked() -> None:
    """A drain is acknowledged when every live balancer acked this request, not an older."""
    assert all_acked(frozenset({"b1", "b2"}), {"b1": "7", "b2": "7"}, 7)
    assert not all_acked(frozenset({"b1", "b2"}), {"b1": "7", "b2": "5"}, 7)
    assert not all_acked(frozenset({"b1"}), {}, 7)
    assert all_acked(frozenset(), {}, 7)
