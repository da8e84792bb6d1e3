"""A stand-in supervisor API for the page's browser tests: the real page router and token
middleware in front of endpoints that follow the API's contracts (``/v1/status``,
``/v1/params``, ``/v1/events``, ``/v1/logs``, ``/v1/changes``), driven by a small state
machine instead of a llama-server. ``POST /stub/crash`` plays a llama-server crash and its
restart. It runs in a thread of the test process (:class:`StubServer`).

It exists so the page's logic is proven while the real routes are still being wired in;
the same tests then run against a real ``corral supervise``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from corral.api.page_routes import page_router
from corral.api.security import TokenAuth
from tests.harness import free_port, wait_for

ALIASES = {"-np": "--parallel", "np": "--parallel", "parallel": "--parallel",
           "-m": "--model", "model": "--model", "-c": "--ctx-size", "ctx-size": "--ctx-size",
           "-a": "--alias", "alias": "--alias", "-t": "--threads", "threads": "--threads"}
KNOWN = {"--parallel", "--model", "--ctx-size", "--alias", "--threads", "--port", "--host"}
INTEGER = {"--parallel", "--ctx-size", "--threads", "--port"}
STEP_S = 0.2  # how long the stub's "llama-server" takes to start


class Stub:
    """The state a supervisor would report, and its event and log rings."""

    def __init__(self, model: Path, *, front: bool = True, fleet: bool = False) -> None:
        self.pids = itertools.count(4242)
        self.event_ids = itertools.count(1)
        self.line_ids = itertools.count(1)
        self.change_ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        self.lines: list[dict[str, Any]] = []
        self.changes: list[dict[str, Any]] = []
        self.args: dict[str, Any] = {"--model": str(model), "--port": "8081"}
        self.binary = "/usr/local/bin/llama-server"
        self.state = "RUNNING"
        self.pid: int | None = next(self.pids)
        self.restarts = 0
        self.generation = 1
        self.ready_at = time.monotonic()
        self.last_error: str | None = None
        self.last_strategy: str | None = None
        self.front = front
        self.fleet = fleet
        self.requests = 0
        self._changed: asyncio.Condition | None = None
        self.log("llama-server", f"main: model loaded from {model}")
        self.log("corral", "llama-server is ready")

    # ---- what changes --------------------------------------------------------------

    @property
    def changed(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def log(self, source: str, text: str) -> None:
        self.lines.append({"id": next(self.line_ids), "time": time.time(), "source": source,
                           "text": text})
        del self.lines[:-1000]

    def emit(self, kind: str, **data: Any) -> None:
        self.events.append({"id": next(self.event_ids), "time": time.time(), "kind": kind,
                            **data})
        del self.events[:-200]

    async def set_state(self, to: str, error: str | None = None) -> None:
        self.emit("state", **{"from": self.state, "to": to, "error": error})
        self.log("corral", f"state {self.state} -> {to}" + (f": {error}" if error else ""))
        self.state = to
        await self._notify()

    def config(self) -> dict[str, Any]:
        argv = [self.binary]
        for flag, value in self.args.items():
            argv += [flag] if value is True else [flag, str(value)]
        return {"binary": self.binary, "args": dict(self.args), "argv": argv, "env": {}}

    def status(self) -> dict[str, Any]:
        self.requests += 1
        running = self.state in ("RUNNING", "APPLYING")
        return {
            "name": "default", "state": self.state, "pid": self.pid,
            "port": int(self.args.get("--port", 8080)), "restarts": self.restarts,
            "generation": self.generation,
            "uptime_s": round(time.monotonic() - self.ready_at, 3) if running else None,
            "last_error": self.last_error, "pending_changes": 0, "consecutive_failures": 0,
            "retry_in_s": None, "config": self.config(), "store": "file /tmp/config.toml",
            "store_connected": True, "last_strategy": self.last_strategy, "candidate": None,
            "fleet": self._fleet(), "front": self._front(), "memory": None,
        }

    def _front(self) -> dict[str, Any] | None:
        if not self.front:
            return None
        return {"listen": "127.0.0.1:8080", "mode": "routing", "active_port": 8081,
                "active_generation": self.generation, "in_flight": 0, "held_now": 0,
                "held_total": 3, "released_total": 3, "retried": 1, "cut": 0,
                "failed": {}, "requests_total": {"2xx": self.requests, "5xx": 0},
                "failed_total": 0}

    def _fleet(self) -> dict[str, Any] | None:
        if not self.fleet:
            return None
        return {"instance_id": "host-a:8080", "in_sync": True, "divergence": None,
                "revision": 7, "rollout": {
                    "revision": 7, "phase": "rolling", "canary": "host-a:8080",
                    "progress": {"host-a:8080": "done", "host-b:8080": "done",
                                 "host-c:8080": "failed"},
                    "reasons": {"host-c:8080": "model file does not exist"}, "reason": None,
                    "applying": ["host-d:8080"], "queued": ["host-e:8080"],
                    "live": ["host-a:8080", "host-b:8080", "host-c:8080", "host-d:8080",
                             "host-e:8080"]}}

    # ---- a change ------------------------------------------------------------------

    def parse(self, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        args = body.get("args")
        if not isinstance(args, dict) or not args:
            return {}, "malformed request: body.args: Input should be a valid dictionary"
        out: dict[str, Any] = {}
        for key, value in args.items():
            flag = ALIASES.get(key, key if key.startswith("--") else "--" + key.lstrip("-"))
            if flag not in KNOWN:
                return {}, f"unknown flag {key!r} (not in llama-server --help)"
            out[flag] = value
        return out, None

    async def apply(self, body: dict[str, Any], client: str) -> JSONResponse:
        args, error = self.parse(body)
        if error:
            return JSONResponse({"status": "error", "error": error}, 400)
        change_id = f"c{next(self.change_ids)}"
        before = self.config()
        merged = dict(self.args)
        for flag, value in args.items():
            if value is None or value is False:
                merged.pop(flag, None)
            else:
                merged[flag] = value if value is True else str(value)
        started = time.monotonic()
        model = merged.get("--model")
        if model and not await asyncio.to_thread(os.path.exists, model):
            return self._rejected(change_id, before, client, started,
                                  f"model file {model!r} does not exist", [])
        bad = [f for f in INTEGER if f in merged and not str(merged[f]).isdigit()]
        if bad:
            log = ["usage: llama-server [options] (stub)",
                   f"error: argument {bad[0]}: invalid int value: {merged[bad[0]]!r}"]
            return self._rejected(change_id, before, client, started,
                                  "llama-server exited with code 2 after 0.3 s", log)
        if merged == self.args:
            return self._result("applied", change_id, restarted=False)
        await self.set_state("APPLYING")
        self.log("llama-server", "fake llama-server starting: "
                 + " ".join(self.config()["argv"][1:]))
        await asyncio.sleep(STEP_S)
        self.args = merged
        self.pid = next(self.pids)
        self.generation += 1
        self.ready_at = time.monotonic()
        self.last_strategy = "start-first"
        self.emit("ready", pid=self.pid, generation=self.generation, load_s=STEP_S)
        await self.set_state("RUNNING")
        self._record(change_id, before, client, started, "applied", None, True)
        return self._result("applied", change_id, restarted=True)

    def _rejected(self, change_id: str, before: dict[str, Any], client: str, started: float,
                  error: str, log: list[str]) -> JSONResponse:
        for line in log:
            self.log("llama-server", line)
        self.log("corral", f"change {change_id} rejected: {error}")
        self._record(change_id, before, client, started, "rejected", error, False)
        return self._result("rejected", change_id, error=error, log=log, http_status=422)

    def _record(self, change_id: str, before: dict[str, Any], client: str, started: float,
                outcome: str, error: str | None, restarted: bool) -> None:
        after = self.config()
        diff = {k: [before["args"].get(k), after["args"].get(k)]
                for k in {**before["args"], **after["args"]}
                if before["args"].get(k) != after["args"].get(k)}
        data = {"change": change_id, "source": "api", "client": client, "outcome": outcome,
                "error": error, "restarted": restarted,
                "strategy": "start-first" if restarted else None,
                "duration_s": round(time.monotonic() - started, 3),
                "before": before, "after": after}
        self.emit("change", **data)
        self.changes.insert(0, {"id": change_id, "time": time.time(), "diff": diff,
                                **{k: v for k, v in data.items()
                                   if k not in ("change", "before", "after")}})
        asyncio.get_running_loop().create_task(self._notify())

    def _result(self, outcome: str, change_id: str, *, restarted: bool = False,
                error: str | None = None, log: list[str] | None = None,
                http_status: int = 200) -> JSONResponse:
        return JSONResponse({"status": outcome, "change_id": change_id, "error": error,
                             "log": log or [], "restarted": restarted,
                             "strategy": "start-first" if restarted else None,
                             "config": self.config(), "rollout": None}, http_status)

    async def crash(self) -> None:
        """llama-server dies (SIGKILL); the supervisor starts a new one."""
        pid = self.pid
        self.emit("crash", reason="crash", pid=pid, code=-9, ran_s=1.0,
                  error="llama-server was killed by SIGKILL")
        self.log("corral", f"llama-server {pid} was killed by SIGKILL")
        self.pid = None
        self.restarts += 1
        self.last_error = "llama-server was killed by SIGKILL"
        await self.set_state("BACKOFF", self.last_error)
        await asyncio.sleep(STEP_S)
        await self.set_state("STARTING")
        await asyncio.sleep(STEP_S)
        self.pid = next(self.pids)
        self.generation += 1
        self.ready_at = time.monotonic()
        self.emit("ready", pid=self.pid, generation=self.generation, load_s=STEP_S)
        self.log("llama-server", "main: server is listening")
        await self.set_state("RUNNING")

    # ---- streams -------------------------------------------------------------------

    async def follow(self, ring: str, last_id: int, request: Request) -> AsyncIterator[str]:
        """SSE: what came after ``last_id``, then each new item; a comment every second
        (so a closed connection is noticed)."""
        kind = "line" if ring == "lines" else None
        while not await request.is_disconnected():
            items = [i for i in getattr(self, ring) if i["id"] > last_id]
            for item in items:
                last_id = item["id"]
                yield (f"id: {item['id']}\nevent: {kind or item['kind']}\n"
                       f"data: {json.dumps(item)}\n\n")
            if not items:
                try:
                    async with self.changed:
                        await asyncio.wait_for(self.changed.wait(), 1.0)
                except TimeoutError:
                    yield ": ping\n\n"


def last_event_id(request: Request, ring: list[dict[str, Any]]) -> int:
    given = request.headers.get("last-event-id", "")
    if given.isdigit():
        return int(given)
    return ring[-1]["id"] if ring else 0


def create_stub_app(stub: Stub, token: str | None = None) -> Any:
    app = FastAPI()
    app.include_router(page_router())

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        return stub.status()

    @app.post("/v1/params")
    async def params(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"status": "error", "error": "malformed JSON"}, 400)
        return await stub.apply(body, request.client.host if request.client else "?")

    @app.get("/v1/changes")
    async def changes(limit: int = 20) -> dict[str, Any]:
        return {"changes": stub.changes[:limit]}

    @app.get("/v1/logs", response_model=None)
    async def logs(request: Request, tail: int = 200,
                   follow: bool = False) -> StreamingResponse | list[dict[str, Any]]:
        if follow:
            start = last_event_id(request, stub.lines)
            return StreamingResponse(stub.follow("lines", start, request),
                                     media_type="text/event-stream")
        return stub.lines[-tail:]

    @app.get("/v1/events")
    async def events(request: Request) -> StreamingResponse:
        start = last_event_id(request, stub.events)
        return StreamingResponse(stub.follow("events", start, request),
                                 media_type="text/event-stream")

    @app.post("/stub/crash")
    async def crash() -> dict[str, Any]:
        asyncio.get_running_loop().create_task(stub.crash())
        return {"pid": stub.pid}

    return TokenAuth(app, token)


class StubServer:
    """The stub app served by uvicorn in a thread, on a free port."""

    def __init__(self, model: Path, token: str | None = None, **kwargs: Any) -> None:
        self.stub = Stub(model, **kwargs)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        config = uvicorn.Config(create_stub_app(self.stub, token), host="127.0.0.1",
                                port=self.port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> StubServer:
        self.thread.start()
        wait_for(lambda: self.server.started, 10, "the stub API up")
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
