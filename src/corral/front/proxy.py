"""The front door: Corral's public HTTP port, forwarding to whichever llama-server is active.

Theory of operation
-------------------
It is a byte pump, not an HTTP server and client. Each client connection is an
``asyncio.Protocol`` (``client.ClientConn``) whose bytes go through httptools' request parser
only to find where a request begins and ends; each upstream connection
(``upstream.UpstreamConn``) writes response bytes to the client the moment they arrive, and
its parser only finds the status and the response's end. SSE and chunked streams therefore
pass through chunk by chunk, headers pass untouched (llama-server's ``--api-key`` works),
and a request body of any size streams on, never held whole except for the retry (below).

A request is an ``Exchange``. When its head is complete the ``Router`` (pure) decides:
forward to the active upstream, wait in the held queue, or refuse (503). The controller
switches the router with ``route_to`` / ``hold`` / ``refuse``; ``route_to`` forwards every
held request at once, in arrival order, before it returns. Each forwarded attempt counts as
in flight on its upstream from the moment it is dispatched until its response ends (or the
client leaves), which is what ``drain`` waits on before the controller stops an upstream.

Upstream connections are kept alive and pooled per upstream. A request is kept whole until
the first byte of its response, so when the connection fails before that (refused, reset,
closed: llama-server crashed or was stopped) it is sent again, once, to wherever the router
says now; if the router still points at the server that just failed, the retry is parked
until the controller switches (it notices the crash at the same instant) or a grace period
ends. A pooled connection that turns out dead earns one free retry on a fresh connection:
that is keep-alive's race, not a crash. A response that stops before its end is a cut: the
client connection is closed (so the client sees an error, not a short answer) and counted.

A client that hangs up aborts its upstream connection, so llama-server notices the closed
socket and frees the slot. Flow control runs both ways: a slow reader pauses the upstream
connection's reads, a slow upstream pauses the client's.

The edge (``edge``; its rules in ``corral.core.edge``) caps client connections and closes
idle and slow ones. Works on asyncio's loop and on uvloop, all on the loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import Counter

from corral.front.client import ClientConn, Exchange
from corral.front.edge import Edge
from corral.front.idle import IdleWaiters
from corral.front.model import FrontSettings, FrontStats, Upstream
from corral.front.responses import CONTINUE, error_response
from corral.front.router import Decision, Held, Rejected, Router
from corral.front.timings import MonotonicClock, Timings
from corral.front.upstream import Pool, UpstreamConn

log = logging.getLogger("corral.front")

__all__ = ["FrontDoor"]


class FrontDoor:
    """Accepts on ``sock`` and forwards to the active upstream; the controller steers it.

    At construction it holds: requests wait until the first ``route_to``.
    """

    def __init__(self, sock: socket.socket, settings: FrontSettings | None = None, *,
                 tls: ssl.SSLContext | None = None,
                 clock: MonotonicClock | None = None) -> None:
        """``clock``: where request durations and waits are read (the system's by default)."""
        self.settings = settings or FrontSettings()
        self._tls = tls  # --tls-cert/--tls-key: clients speak HTTPS to the front door
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self._listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._router: Router[Exchange] = Router(self.settings.max_held)
        self._pool = Pool()
        self._connecting: set[asyncio.Task[None]] = set()
        self._draining: set[Upstream] = set()
        self._idle = IdleWaiters(self._router.in_flight)
        self._server: asyncio.Server | None = None
        self._closed: asyncio.Future[None] | None = None
        self._closing = False
        self._retried = 0
        self._cut = 0
        self._failed: Counter[str] = Counter()
        self.status_classes = [0] * 6   # responses by status class (upstream ones counted
        self.timing = Timings(clock)    # by the upstream connection, when the head comes)
        self.edge = Edge(self.settings, self.timing.clock, self.answer_early)
        self._clients = self.edge.open

    # ---- lifetime -----------------------------------------------------------------------

    async def serve(self) -> None:
        """Accept and forward until ``close`` ends, or until cancelled (which cuts)."""
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        handshake_s = (self.settings.header_timeout_s or None) if self._tls else None
        self._server = await loop.create_server(lambda: ClientConn(self, self.edge),  # type: ignore[arg-type,return-value]
                                                sock=self._sock, backlog=1024, ssl=self._tls,
                                                ssl_handshake_timeout=handshake_s)
        self.edge.start()
        try:
            await self._closed
        finally:
            self._abort_all()

    async def close(self, drain_timeout_s: float) -> None:
        """Stop accepting, let in-flight requests finish (up to the timeout), answer the held
        ones 503, close every connection."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            if client.is_idle():
                client.transport.close()
        await self._idle.wait(None, drain_timeout_s)
        self.refuse("Corral is shutting down")
        self._abort_all()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def _abort_all(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        self.edge.stop()
        for task in list(self._connecting):
            task.cancel()
        for client in list(self._clients):
            if client.queue:
                self.client_lost(client)   # still waiting for an answer: it is cut
                client.transport.abort()
            else:
                client.transport.close()   # flushes what was written (a 503 ...)
        self._pool.close_idle()

    # ---- the controller's switches ------------------------------------------------------

    def route_to(self, upstream: Upstream) -> None:
        """New requests, and every held one (in arrival order, now), go to ``upstream``."""
        self._draining.discard(upstream)
        for ex in self._router.route_to(upstream).release:
            ex.cancel_timer()
            self._start(ex, upstream)

    def hold(self) -> None:
        """New requests wait in the held queue until ``route_to`` (or time out)."""
        for ex in self._router.hold():
            self._hold_timer(ex)

    def refuse(self, reason: str) -> None:
        """Everything waiting, and every new request, is answered 503 with ``reason``."""
        for ex in self._router.refuse(reason).reject:
            ex.cancel_timer()
            self._fail(ex, 503, "refused", reason)

    async def drain(self, upstream: Upstream, timeout_s: float) -> int:
        """Wait until no request is in flight on ``upstream`` (at most ``timeout_s``); return
        how many still are. Its idle connections are closed, and no more are kept."""
        self._draining.add(upstream)
        self._pool.close_idle(upstream)
        return await self._idle.wait(upstream, timeout_s)

    def cut(self, upstream: Upstream) -> int:
        """Cut every request still in flight on ``upstream`` (its drain timed out), so its
        llama-server can stop at once: it does not exit on SIGTERM while a request runs."""
        clients = [c for c in self._clients
                   if any(ex.conn is not None and ex.conn.upstream == upstream
                          for ex in c.queue)]
        for client in clients:
            self._cut += 1
            self.client_lost(client)
            client.transport.abort()
        if clients:
            log.warning("front door: cut %d request(s) still running on port %d after the "
                        "drain timeout", len(clients), upstream.port)
        return len(clients)

    def in_flight(self, upstream: Upstream | None = None) -> int:
        return self._router.in_flight(upstream)

    def stats(self) -> FrontStats:
        active = self._router.active
        classes = {f"{i}xx": n for i, n in enumerate(self.status_classes) if i and n}
        return FrontStats(
            listen=self._listen, mode=self._router.mode.value,
            active_port=active.port if active else None,
            active_generation=active.generation if active else None,
            in_flight=self._router.in_flight(), held_now=self._router.held_now,
            held_total=self._router.held_total, released_total=self._router.released_total,
            retried=self._retried, cut=self._cut, failed=dict(self._failed),
            requests_total=classes, connections=len(self._clients),
            max_connections=self.edge.table.max_connections,
            closed_idle=self.edge.closed_idle)

    def timings(self) -> dict[str, tuple[str, tuple[float, ...], list[int], float]]:
        """Histograms for /metrics: see :meth:`Timings.histograms`."""
        return self.timing.histograms()

    # ---- requests -----------------------------------------------------------------------

    def pump(self, ex: Exchange) -> None:
        """The client's current exchange has news: submit it, or send what arrived."""
        if not ex.submitted:
            ex.submitted = True
            ex.began = self.timing.clock.monotonic()
            decision = self._router.admit(ex)
            if ex.expect_continue and not ex.body_done and type(decision) is not Rejected:
                ex.client.write(CONTINUE)
            self._decide(ex, decision)
        elif ex.conn is not None:
            ex.conn.send(ex)

    def _decide(self, ex: Exchange, decision: Decision) -> None:
        if type(decision) is Upstream:
            self._start(ex, decision)
        elif decision is Held.QUEUED:
            self.timing.waits(ex)
            self._hold_timer(ex)
        elif decision is Held.PARKED:
            self.timing.waits(ex)
            ex.cancel_timer()
            loop = asyncio.get_running_loop()
            ex.timer = loop.call_later(self.settings.retry_grace_s, self._grace_over, ex)
        else:
            assert isinstance(decision, Rejected)
            self._fail(ex, 503, decision.cause, decision.reason)

    def _hold_timer(self, ex: Exchange) -> None:
        ex.cancel_timer()
        loop = asyncio.get_running_loop()
        ex.timer = loop.call_later(self.settings.hold_timeout_s, self._hold_expired, ex)

    def _hold_expired(self, ex: Exchange) -> None:
        ex.timer = None
        if self._router.withdraw(ex):
            self._fail(ex, 503, "hold_timeout", "no llama-server was ready within "
                       f"{self.settings.hold_timeout_s:g} s")

    def _grace_over(self, ex: Exchange) -> None:
        ex.timer = None
        decision = self._router.unpark(ex)
        if decision is not None:
            self._decide(ex, decision)

    def _start(self, ex: Exchange, upstream: Upstream, fresh: bool = False) -> None:
        if self.timing.waiting:
            self.timing.waited(ex)
        self._router.started(upstream)
        ex.upstream = upstream
        ex.attempt += 1
        conn = None if fresh else self._pool.take(upstream)
        if conn is not None:
            conn.bind(ex)
            conn.send(ex)
            return
        task = asyncio.get_running_loop().create_task(self._connect(ex, upstream, ex.attempt))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, ex: Exchange, upstream: Upstream, attempt: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(  # type: ignore[type-var]
                lambda: UpstreamConn(self, upstream), upstream.host, upstream.port)
        except OSError as exc:
            if ex.attempt == attempt and not ex.gone:
                self._attempt_failed(ex, upstream, False, f"connect: {exc.strerror or exc}")
            return
        if ex.attempt != attempt or ex.gone:
            self._release(conn)
            return
        conn.bind(ex)
        conn.send(ex)

    def _end_attempt(self, ex: Exchange) -> None:
        """The attempt stops counting as in flight (exactly once per attempt)."""
        upstream = ex.upstream
        if upstream is None:
            return
        ex.upstream = None
        ex.conn = None
        self._idle.finished(upstream, self._router.finished(upstream))

    def _attempt_failed(self, ex: Exchange, upstream: Upstream, reused: bool, why: str) -> None:
        self._end_attempt(ex)
        if ex.gone:
            return
        if reused and not ex.stale_retried:
            ex.stale_retried = True
            self._start(ex, upstream, fresh=True)
        elif ex.retried:
            self._fail(ex, 502, "bad_gateway",
                       f"llama-server (port {upstream.port}) failed before answering: {why}")
        else:
            ex.retried = True
            self._retried += 1
            log.info("front door: %s %s got no answer from port %d (%s); retrying once",
                     ex.method.decode(), ex.url.decode(errors="replace")[:80], upstream.port,
                     why)
            self._decide(ex, self._router.readmit(ex, upstream))

    def _fail(self, ex: Exchange, status: int, cause: str, message: str) -> None:
        """Answer ``ex`` from the front door itself."""
        self.timing.waited(ex)
        self._failed[cause] += 1
        self.count_status(status)
        close = not ex.body_done or not ex.keep_alive or self._closing
        retry_after = self.settings.retry_after_s if status == 503 else None
        ex.client.write(error_response(status, message, retry_after_s=retry_after,
                                       close=close, head_only=ex.is_head))
        self._client_done(ex, close)

    def bad_request(self, client: ClientConn, message: str) -> None:
        self.answer_early(client, 400, "bad_request", message)

    def answer_early(self, client: ClientConn, status: int, cause: str, message: str) -> None:
        """Answer ``client`` before (or instead of) a request it sent whole, and close."""
        self._failed[cause] += 1
        self.count_status(status)
        retry_after = self.settings.retry_after_s if status == 503 else None
        client.write(error_response(status, message, close=True, retry_after_s=retry_after))
        self.edge.drop(client, linger=True)

    def _client_done(self, ex: Exchange, close: bool) -> None:
        client = ex.client
        ex.gone = True
        self.timing.durations.observe(self.timing.clock.monotonic() - ex.began)
        if client.queue and client.queue[0] is ex:
            client.queue.popleft()
        if close or client.closing or self._closing:
            client.closing = True
            client.transport.close()
        elif client.queue:
            self.pump(client.queue[0])
        elif client.parsing is None:
            self.edge.went_idle(client)

    def count_status(self, status: int) -> None:
        self.status_classes[min(status // 100, 5)] += 1

    # ---- called by the connections ------------------------------------------------------

    def client_opened(self, client: ClientConn) -> None:
        if self._closing:
            client.closing = True
            client.transport.close()
        else:
            self.edge.opened(client)

    def client_lost(self, client: ClientConn) -> None:
        """The client hung up: whatever it asked for is abandoned, upstream too."""
        self.edge.lost(client)
        for ex in client.queue:
            ex.gone = True
            ex.cancel_timer()
            self.timing.waited(ex)   # a request whose client left has no duration
            self._router.withdraw(ex)
            conn = ex.conn
            self._end_attempt(ex)
            if conn is not None:
                conn.unbind()
                conn.transport.abort()   # llama-server sees the socket close: frees the slot
        client.queue.clear()

    def response_done(self, ex: Exchange, conn: UpstreamConn) -> None:
        """The response ended: the upstream connection goes back to the pool."""
        self._end_attempt(ex)
        conn.unbind()
        if conn.keep_alive:
            self._release(conn)
        else:
            conn.transport.close()
        self._client_done(ex, not ex.body_done or not ex.keep_alive or not conn.keep_alive)

    def _release(self, conn: UpstreamConn) -> None:
        if self._closing or conn.upstream in self._draining or conn.transport.is_closing():
            conn.transport.close()
        else:
            self._pool.put(conn)

    def upstream_lost(self, conn: UpstreamConn, exc: Exception | None) -> None:
        self._pool.discard(conn)
        ex = conn.ex
        if ex is None:
            return
        conn.unbind()
        if not ex.responded:
            why = f"{type(exc).__name__}: {exc}" if exc else "connection closed"
            self._attempt_failed(ex, conn.upstream, conn.reused, why)
        elif conn.is_eof_delimited():
            self._end_attempt(ex)
            self._client_done(ex, True)
        else:
            self._cut += 1
            log.warning("front door: the response to %s %s from port %d was cut before its "
                        "end", ex.method.decode(), ex.url.decode(errors="replace")[:80],
                        conn.upstream.port)
            self._end_attempt(ex)
            self._client_done(ex, True)
