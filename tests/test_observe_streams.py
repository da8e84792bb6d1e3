"""Event and log streams in-process: the buses' follow, SSE framing, Last-Event-ID replay
and gaps, keep-alives, and the routes of corral.api.observe_routes on a controller built
from tests/fakes.py, driven through ASGI by hand (tests/asgi_stream.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from corral.api.observe_routes import Closing, follow, format_sse, observe_router, replay_start
from corral.observe.audit import AuditLog
from corral.observe.events import EventBus, LineBus, LineHandler
from corral.supervisor.changes import config_json
from tests.asgi_stream import AsgiStream, other_tasks, parse_sse
from tests.fakes import Rig, config


async def no_task_left() -> None:
    """Cancelled tasks finish within a few loop iterations; then none may remain."""
    for _ in range(20):
        if not other_tasks():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"tasks left behind: {other_tasks()}")


def app_of(rig: Rig, lines: LineBus, audit: AuditLog | None = None,
           keepalive_s: float = 15.0) -> FastAPI:
    app = FastAPI()
    app.include_router(observe_router(rig.controller, lines, audit, keepalive_s=keepalive_s))
    return app


# ---- the pieces -----------------------------------------------------------------------------


def test_sse_framing() -> None:
    """id, event, one data line of compact JSON, a blank line; no id when None."""
    assert format_sse("state", {"a": 1, "b": "x\ny"}, 7) == (
        b'id: 7\nevent: state\ndata: {"a":1,"b":"x\\ny"}\n\n')
    assert format_sse("gap", {}) == b"event: gap\ndata: {}\n\n"


def test_replay_start_and_gaps() -> None:
    """Nothing lost: no notice; the oldest kept newer than asked: a gap saying how many;
    an id newer than any (a restarted supervisor numbers from 1): start over, reset."""
    bus = EventBus(size=3)
    for n in range(5):
        bus.emit("tick", n=n)  # ids 1..5, ids 3..5 kept
    assert replay_start(bus, 3) == (3, None)
    assert replay_start(bus, 2) == (2, None)
    assert replay_start(bus, 5) == (5, None)
    assert replay_start(bus, 0) == (0, {"asked": 0, "oldest": 3, "missed": 2, "reset": False})
    assert replay_start(bus, 1) == (1, {"asked": 1, "oldest": 3, "missed": 1, "reset": False})
    assert replay_start(bus, 9) == (0, {"asked": 9, "oldest": 3, "missed": None, "reset": True})
    assert replay_start(EventBus(), 0) == (0, None)


async def test_follow_replays_then_streams_keeps_alive_and_ends_on_close() -> None:
    """follow: what is kept after the id, then new items as they come, None at each silent
    keep-alive interval; closing ends it after what is already there, with no task left."""
    lines, closing = LineBus(), Closing()
    lines.add("corral", "one")
    lines.add("llama-server", "two")
    stream = follow(lines, 1, closing, keepalive_s=0.05)
    first = await anext(stream)
    assert (first.id, first.source, first.text) == (2, "llama-server", "two")
    assert await anext(stream) is None  # silence: a keep-alive
    lines.add("corral", "three")
    assert (await anext(stream)).text == "three"
    lines.add("corral", "four")
    closing.close()
    rest = [item async for item in stream]
    assert [i.text for i in rest if i is not None] == ["four"]
    await no_task_left()


async def test_follow_cancelled_leaves_no_task() -> None:
    """A consumer cancelled while waiting (a client hanging up) leaves nothing running."""
    bus = EventBus()

    async def consume() -> None:
        async for _ in follow(bus, 0, Closing(), keepalive_s=60):
            pass

    task = asyncio.create_task(consume())
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(other_tasks()) == 2  # the consumer and its one waiter
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await no_task_left()
    bus.emit("later")  # the ring's waiter was cancelled: waking it is harmless


def test_line_handler_labels_the_supervisors_records() -> None:
    """Records of the 'corral' logger become lines of source 'corral'; llama-server's echo
    (corral.llama) is not doubled."""
    lines = LineBus()
    logger = logging.getLogger("corral.test_streams")
    handler = LineHandler(lines)
    logging.getLogger("corral").addHandler(handler)
    try:
        logger.warning("applying %s", "x")
        logging.getLogger("corral.llama").warning("[llama-server 1] hello")
    finally:
        logging.getLogger("corral").removeHandler(handler)
    assert [(ln.source, ln.text) for ln in lines.tail(5)] == [
        ("corral", "WARNING corral.test_streams: applying x")]


# ---- the routes ---------------------------------------------------------------------------


async def test_events_stream_replays_after_last_event_id_with_a_gap_notice() -> None:
    """Reconnect with Last-Event-ID: a gap notice (the oldest kept is newer), the kept
    events after it in order with id/event/data, then live ones."""
    rig = Rig()
    rig.controller.events = bus = EventBus(size=4)
    for n in range(6):
        bus.emit("tick", n=n)  # 1..6, 3..6 kept
    app = app_of(rig, LineBus())
    s = AsgiStream(app, "/v1/events", headers={"last-event-id": "1"})
    await s.read_until(lambda t: t.count("event: tick") == 4, "the kept events")
    assert s.status == 200 and s.headers["content-type"].startswith("text/event-stream")
    assert s.headers["cache-control"] == "no-cache"
    bus.emit("state", **{"from": "RUNNING", "to": "APPLYING", "error": None})
    await s.read_until(lambda t: "event: state" in t, "the live event")
    messages = parse_sse(s.text)
    assert messages[0]["event"] == "gap" and "id" not in messages[0]
    assert json.loads(messages[0]["data"]) == {"asked": 1, "oldest": 3, "missed": 1,
                                               "reset": False}
    assert [m["id"] for m in messages[1:]] == ["3", "4", "5", "6", "7"]
    live = json.loads(messages[-1]["data"])
    assert live["id"] == 7 and live["kind"] == "state" and live["to"] == "APPLYING"
    assert isinstance(live["time"], float)
    await s.hang_up()
    await no_task_left()


async def test_events_since_query_and_default_new_only() -> None:
    """?since=N replays after N without a gap; no id at all streams only new events."""
    rig = Rig()
    bus = rig.controller.events
    bus.emit("a")
    bus.emit("b")
    app = app_of(rig, LineBus())
    replay = AsgiStream(app, "/v1/events", "since=1")
    fresh = AsgiStream(app, "/v1/events")
    await replay.read_until(lambda t: "event: b" in t, "event b")
    await fresh.read_until(lambda _: fresh.status is not None, "the headers")
    bus.emit("c")
    await fresh.read_until(lambda t: "event: c" in t, "event c")
    await replay.read_until(lambda t: "event: c" in t, "event c")
    assert [m["event"] for m in parse_sse(replay.text)] == ["b", "c"]
    assert [m["event"] for m in parse_sse(fresh.text)] == ["c"]
    await replay.hang_up()
    await fresh.hang_up()
    await no_task_left()


async def test_keep_alive_comment_during_silence() -> None:
    """A comment line keeps proxies from closing a quiet stream (every 15 s by default)."""
    rig = Rig()
    s = AsgiStream(app_of(rig, LineBus(), keepalive_s=0.05), "/v1/events")
    await s.read_until(lambda t: ": keep-alive\n\n" in t, "a keep-alive")
    assert parse_sse(s.text)[0] == {"comment": "keep-alive"}
    await s.hang_up()
    await no_task_left()


async def test_logs_tail_and_follow_with_last_event_id() -> None:
    """?tail=N answers the newest N as JSON; ?follow=1 streams the last N then new lines
    (event 'line'); a reconnect resumes after its Last-Event-ID."""
    rig = Rig()
    lines = LineBus()
    for n in range(5):
        lines.add("llama-server" if n % 2 else "corral", f"line {n}")
    app = app_of(rig, lines)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        r = await http.get("/v1/logs", params={"tail": 2})
        assert r.status_code == 200
        tail = r.json()
        assert [(x["id"], x["source"], x["text"]) for x in tail] == [
            (4, "llama-server", "line 3"), (5, "corral", "line 4")]
        assert set(tail[0]) == {"id", "time", "source", "text"}
        assert len((await http.get("/v1/logs")).json()) == 5  # default 200
        assert (await http.get("/v1/logs", params={"tail": -1})).status_code == 422
    s = AsgiStream(app, "/v1/logs", "follow=1&tail=2")
    await s.read_until(lambda t: t.count("event: line") == 2, "the tail")
    lines.add("llama-server", "live")
    await s.read_until(lambda t: "live" in t, "the live line")
    got = [json.loads(m["data"]) for m in parse_sse(s.text)]
    assert [g["text"] for g in got] == ["line 3", "line 4", "live"]
    assert [m["id"] for m in parse_sse(s.text)] == ["4", "5", "6"]
    await s.hang_up()
    again = AsgiStream(app, "/v1/logs", "follow=1", headers={"Last-Event-ID": "5"})
    await again.read_until(lambda t: "live" in t, "the missed line")
    assert [json.loads(m["data"])["text"] for m in parse_sse(again.text)] == ["live"]
    await again.hang_up()
    await no_task_left()


async def test_streams_end_when_the_supervisor_stops() -> None:
    """At shutdown (STOPPING) every stream ends by itself, after the last events, so the
    HTTP server can exit without waiting for clients."""
    async with Rig() as rig:
        lines = LineBus()
        app = app_of(rig, lines)
        await rig.until_state("RUNNING")
        events = AsgiStream(app, "/v1/events", "since=0")
        logs = AsgiStream(app, "/v1/logs", "follow=1")
        await events.read_until(lambda t: '"to":"RUNNING"' in t, "RUNNING")
        await logs.read_until(lambda _: logs.status == 200, "the headers")
        await rig.shutdown()
        text = await events.read_to_end()
        await logs.read_to_end()
        kinds = [json.loads(m["data"])["to"] for m in parse_sse(text)
                 if m.get("event") == "state"]
        assert kinds[-2:] == ["STOPPING", "STOPPED"]
        assert events.status == 200
    await no_task_left()


async def test_a_stream_opened_after_stop_ends_at_once() -> None:
    """An event stream opened after shutdown sends the kept events, then ends at once."""
    async with Rig() as rig:
        app = app_of(rig, LineBus())
        await rig.until_state("RUNNING")
        await rig.shutdown()
    s = AsgiStream(app, "/v1/events", "since=0")
    text = await s.read_to_end()
    assert "STOPPED" in text  # what was kept, then the end
    await no_task_left()


async def test_changes_lists_the_audit_log_newest_first(tmp_path: Path) -> None:
    """GET /v1/changes?limit=N: the last N audit entries, newest first; 404 without a log."""
    rig = Rig()
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.listen_to(rig.controller.events)
    for n in range(3):
        rig.controller.events.emit(
            "change", change=f"c{n + 1}", source="api", client="127.0.0.1", outcome="applied",
            error=None, restarted=True, strategy="stop-first", duration_s=1.0,
            before=config_json(config()), after=config_json(config(parallel=str(n + 2))))
    transport = httpx.ASGITransport(app=app_of(rig, LineBus(), audit))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        r = await http.get("/v1/changes", params={"limit": 2})
        assert r.status_code == 200
        changes: list[dict[str, Any]] = r.json()["changes"]
        assert [c["id"] for c in changes] == ["c3", "c2"]
        assert changes[0]["diff"] == {"--parallel": [None, "4"]}
        assert (changes[0]["source"], changes[0]["client"]) == ("api", "127.0.0.1")
        assert (await http.get("/v1/changes", params={"limit": 0})).status_code == 422
    transport = httpx.ASGITransport(app=app_of(rig, LineBus(), None))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.get("/v1/changes")).status_code == 404


async def test_llama_server_output_reaches_the_line_bus(tmp_path: Path) -> None:
    """The real launcher feeds each line of llama-server's output to the LineBus."""
    from corral.child.launcher import ProcessLauncher
    from corral.core.args import LlamaConfig

    script = tmp_path / "talk.sh"
    script.write_text("#!/bin/sh\necho hello from the server\necho second line >&2\n")
    script.chmod(0o755)
    lines = LineBus()
    launcher = ProcessLauncher(echo_output=False, lines=lines)
    child = await launcher.spawn(LlamaConfig(str(script)), 1)
    try:
        async with asyncio.timeout(10):
            await child.exited
            await child.kill()  # reaps and waits for the pipe to be drained
    finally:
        await launcher.aclose()
    assert [(ln.source, ln.text) for ln in lines.tail(5)] == [
        ("llama-server", "hello from the server"), ("llama-server", "second line")]
