"""The one owner of the llama-server process: applies, revivals and shutdown, one at a time.

Theory of operation
-------------------
HTTP handlers only validate and *submit* a change; it joins the open batch of the
:class:`~corral.core.debounce.Debouncer` and the handler awaits the batch's outcome. This
task loops: it wakes when a batch is due, when the child exits, when a backoff delay ends,
or when a liveness probe is due, and handles exactly one of those at a time. Because
nothing else touches the child, a revival can never run in the middle of an apply and two
llama-servers can never be started side by side.

An apply is a transaction: stop old -> start new -> ready -> persist -> answer. If the
new config fails, the last good one is started again and the batch is answered 422; if
persisting fails, the same rollback happens and the answer says why. Nothing of a rejected
change is kept.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from corral.changes import MAX_CHANGE_RECORDS, ChangeRecord, config_json
from corral.child import preflight
from corral.child.pidfile import PidFile
from corral.child.process import Child, spawn
from corral.child.ready import is_alive, wait_ready
from corral.core.args import Change, LlamaConfig, host_of, port_of
from corral.core.backoff import BackoffPolicy, StartHistory
from corral.core.debounce import Debouncer
from corral.core.lifecycle import Lifecycle, State
from corral.core.local import LocalOverrides
from corral.core.plan import plan_batch
from corral.errors import PreflightFailed, StartFailed, StoreError, StoreUnavailable
from corral.failpoints import failpoint
from corral.store.base import ConfigStore, StoredConfig

log = logging.getLogger("corral")



@dataclass(frozen=True)
class Settings:
    ready_timeout_s: float = 300.0
    stop_timeout_s: float = 10.0
    min_healthy_s: float = 0.3
    debounce_s: float = 0.2
    max_batch_age_s: float = 2.0
    liveness_interval_s: float = 0.0
    liveness_failures: int = 3
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    echo_output: bool = True


@dataclass(frozen=True)
class Startup:
    """What to run at start: the stored config wins, the CLI config is the fallback."""

    preferred: LlamaConfig
    fallback: LlamaConfig | None = None
    persist_when_ready: bool = False


class Controller:
    def __init__(self, name: str, store: ConfigStore, startup: Startup, settings: Settings,
                 pidfile: PidFile | None = None,
                 catalogs: preflight.CatalogCache | None = None,
                 local: LocalOverrides | None = None) -> None:
        self.name = name
        self.store = store
        self.settings = settings
        self.catalogs = catalogs or preflight.CatalogCache()
        self.last_good = startup.preferred
        self.lifecycle = Lifecycle()
        self.child: Child | None = None
        self.restarts = 0
        self.generation = 0
        self.last_error: str | None = None
        self.ready_since: float | None = None
        self.retry_at: float | None = None
        self.on_state_change: Callable[[], Awaitable[None]] | None = None
        self.local = local
        self.fleet: dict[str, Any] | None = None  # set by corral.fleet when in a fleet
        self._startup = startup
        self._pidfile = pidfile
        self._history = StartHistory()
        self._debouncer: Debouncer[ChangeRecord] = Debouncer(
            settings.debounce_s, settings.max_batch_age_s)
        self._records: OrderedDict[str, ChangeRecord] = OrderedDict()
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._http = httpx.AsyncClient()
        self._liveness_misses = 0
        self._next_liveness: float | None = None
        # A probe runs beside the loop: a hung server must not delay applies or revivals.
        self._probe: asyncio.Future[bool] | None = None
        self._in_flight: list[ChangeRecord] = []  # answered 503 if shutdown cuts an apply
        self._stopping: Child | None = None  # what a second signal must kill at once

    # ---- what the API calls -------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.lifecycle.state

    def submit(self, change: Change, source: str = "api") -> ChangeRecord:
        loop = asyncio.get_running_loop()
        record = ChangeRecord(f"c{next(self._ids)}", change, time.time(), loop.create_future(),
                              source=source)
        self._records[record.id] = record
        while len(self._records) > MAX_CHANGE_RECORDS:
            self._records.popitem(last=False)
        self._debouncer.add(record, time.monotonic())
        self._wake.set()
        return record

    def record(self, change_id: str) -> ChangeRecord | None:
        return self._records.get(change_id)

    @property
    def store_connected(self) -> bool:
        """False while a networked store (etcd) is known to be unreachable."""
        return bool(getattr(self.store, "is_connected", True))

    @property
    def pending_changes(self) -> int:
        return self._debouncer.pending

    async def check(self, config: LlamaConfig) -> None:
        """Pre-flight ``config`` against what runs now; raise PreflightFailed."""
        catalog = await self.catalogs.get(config.binary)
        running = self.child.config if self.child and not self.child.exited.done() else None
        preflight.check_config(config, running, catalog)

    # ---- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._start_at_boot()
            while True:
                await self._wait_for_work()
                await self._do_due_work()
        finally:
            await self._shutdown()

    async def _wait_for_work(self) -> None:
        waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(self._wake.wait())}
        if self.child is not None:
            waits.add(self.child.exited)
        if self._probe is not None:
            waits.add(self._probe)
        deadlines = [d for d in (self._debouncer.deadline(), self.retry_at,
                                 self._next_liveness) if d is not None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            if w is not (self.child.exited if self.child else None) and w is not self._probe:
                w.cancel()
        self._wake.clear()

    async def _do_due_work(self) -> None:
        now = time.monotonic()
        if self.child is not None and self.child.exited.done():
            await self._on_crash(self.child)
        elif self.retry_at is not None and now >= self.retry_at:
            self.retry_at = None
            await self._start_with_backoff([self.last_good])
        elif self._debouncer.is_due(now):
            await self._apply(self._debouncer.take(now))
        elif self._probe is not None and self._probe.done():
            await self._on_probe(self._probe.result())
        elif self._next_liveness is not None and now >= self._next_liveness:
            self._start_probe()

    # ---- starting and reviving -------------------------------------------------------------

    async def _start_at_boot(self) -> None:
        if self._pidfile is not None:
            self._pidfile.kill_stale()
        candidates = [self._startup.preferred]
        if self._startup.fallback is not None and self._startup.fallback != self._startup.preferred:
            candidates.append(self._startup.fallback)
        await self._start_with_backoff(candidates, persist=self._startup.persist_when_ready)

    async def _start_with_backoff(self, candidates: list[LlamaConfig],
                                  persist: bool = False) -> LlamaConfig | None:
        """Start the first candidate that becomes ready; else schedule a retry or go FATAL."""
        self._move(State.STARTING)
        errors = []
        for config in candidates:
            try:
                await self._start(config)
            except (StartFailed, PreflightFailed) as exc:
                errors.append(str(exc))
                if config is not candidates[-1]:
                    log.error("stored config failed to start (%s); FALLING BACK to the "
                              "command-line config", exc)
                continue
            if config != self.last_good:
                log.warning("running the command-line config; the stored config is kept "
                            "until another config is applied successfully")
            self.last_good = config
            self._history.succeeded()
            if persist:
                try:
                    await self._persist(config)
                except StoreError as exc:
                    log.error("could not store the running config: %s", exc)
            self._move(State.RUNNING)
            return config
        failures = self._history.failed()
        delay = self.settings.backoff.delay_after(failures)
        self.last_error = "; ".join(errors)
        if delay is None:
            log.error("llama-server failed to start %d times in a row: FATAL; apply a new "
                      "config to try again. Last error: %s", failures, self.last_error)
            self._move(State.FATAL)
        else:
            log.warning("start failed (%d in a row); retrying in %.1f s", failures, delay)
            self.retry_at = time.monotonic() + delay
            self._move(State.BACKOFF)
        return None

    async def _start(self, config: LlamaConfig) -> Child:
        """Spawn ``config`` and wait until it is ready; on failure nothing is left running."""
        await self.check(config)
        self.generation += 1
        try:
            child = await spawn(config, self.generation, self.settings.echo_output)
        except OSError as exc:
            raise StartFailed(f"cannot execute {config.binary}: {exc.strerror or exc}") from None
        self.child = child
        if self._pidfile is not None:
            self._pidfile.record(child.pid)
        log.info("started llama-server (pid %d, generation %d) on port %d: %s",
                 child.pid, self.generation, port_of(config), " ".join(config.argv()))
        try:
            took = await wait_ready(child, self._health_url(config), self._http,
                                    self.settings.ready_timeout_s, self.settings.min_healthy_s)
        except BaseException:
            await self._stop_child()
            raise
        self.ready_since = time.monotonic()
        self._liveness_misses = 0
        self._schedule_liveness()
        log.info("llama-server (pid %d) is ready after %.1f s", child.pid, took)
        return child

    async def _on_crash(self, child: Child) -> None:
        code = child.exited.result()
        await child.kill()  # reap the rest of its group
        self.child = None
        self._cancel_probe()
        self._clear_pidfile()
        tail = " | ".join(child.output.tail(5))
        self.last_error = (f"llama-server exited with code {code} after {child.uptime():.1f} s"
                           + (f": {tail}" if tail else ""))
        log.error("%s; reviving with the last good config", self.last_error)
        self.restarts += 1
        await self._start_with_backoff([self.last_good])

    def _start_probe(self) -> None:
        self._next_liveness = None
        if self.child is not None and self.state is State.RUNNING:
            self._probe = asyncio.ensure_future(
                is_alive(self._http, self._health_url(self.child.config)))

    async def _on_probe(self, alive: bool) -> None:
        self._probe = None
        self._schedule_liveness()
        child = self.child
        if child is None or alive:
            self._liveness_misses = 0
            return
        self._liveness_misses += 1
        if self._liveness_misses >= self.settings.liveness_failures:
            log.error("llama-server (pid %d) failed %d health checks in a row: restarting it",
                      child.pid, self._liveness_misses)
            await child.kill()  # the loop sees the exit and revives it

    def _cancel_probe(self) -> None:
        self._next_liveness = None
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None

    def _schedule_liveness(self) -> None:
        interval = self.settings.liveness_interval_s
        self._next_liveness = time.monotonic() + interval if interval > 0 else None

    # ---- applying a batch ---------------------------------------------------------------

    async def _apply(self, batch: list[ChangeRecord]) -> None:
        plan = plan_batch(self.last_good, self.state is State.RUNNING, [r.change for r in batch])
        if plan.is_noop:
            log.info("batch of %d change(s) leaves the config as it is: no restart", len(batch))
            for r in batch:
                r.finish("applied", 200, self.last_good)
            return
        try:
            await self.check(plan.desired)
        except PreflightFailed as exc:
            log.warning("batch of %d change(s) rejected before any restart: %s", len(batch), exc)
            for r in batch:
                r.finish("rejected", 422, self.last_good, str(exc))
            return
        prior = self.state
        self._in_flight = batch
        self._move(State.APPLYING)
        self.retry_at = None
        log.info("applying a batch of %d change(s): %s", len(batch),
                 " ".join(plan.desired.argv()))
        await self._stop_child()
        failpoint("after_stop_old")
        try:
            await self._start(plan.desired)
            failpoint("after_start_new")
            failpoint("before_persist")
            # A config that came from the store (a fleet peer's write) is stored already.
            if any(r.source != "fleet" for r in batch):
                await self._persist(plan.desired)
            failpoint("after_persist")
        except (StartFailed, PreflightFailed, StoreError) as exc:
            await self._stop_child()
            await self._after_failed_apply(batch, exc, prior)
            return
        self.last_good = plan.desired
        self._history.succeeded()
        self.last_error = None
        self._move(State.RUNNING)
        for r in batch:
            r.finish("applied", 200, plan.desired, restarted=True)

    async def _after_failed_apply(self, batch: list[ChangeRecord], exc: Exception,
                                  prior: State) -> None:
        tail = exc.log if isinstance(exc, StartFailed) else []
        status, code = ("failed", 503) if isinstance(exc, StoreUnavailable) else (
            ("failed", 500) if isinstance(exc, StoreError) else ("rejected", 422))
        reason = str(exc)
        if prior is State.RUNNING:
            log.error("new config failed (%s); rolling back to the last good config", reason)
            self._move(State.ROLLING_BACK)
            try:
                await self._start(self.last_good)
            except (StartFailed, PreflightFailed) as again:
                reason = f"{reason}; and the rollback failed too: {again}"
                self._move(State.FATAL)
            else:
                self._move(State.RUNNING)
        elif prior is State.BACKOFF:
            self.retry_at = time.monotonic() + (self.settings.backoff.delay_after(
                self._history.consecutive_failures) or 0.0)
            self._move(State.BACKOFF)
        else:  # FATAL stays FATAL: the last good config already failed to start
            self._move(State.FATAL)
        self.last_error = reason
        for r in batch:
            r.finish(status, code, self.last_good, reason, tail)

    async def _persist(self, config: LlamaConfig) -> None:
        shared = self.local.strip(config) if self.local else config
        await self.store.save(self.name, StoredConfig.now(shared))

    # ---- stopping ------------------------------------------------------------------------

    async def _stop_child(self) -> None:
        child, self.child = self.child, None
        self.ready_since = None
        self._cancel_probe()
        if child is not None:
            self._stopping = child
            try:
                code = await child.stop(self.settings.stop_timeout_s)
            finally:
                self._stopping = None
            log.info("llama-server (pid %d) stopped (code %d)", child.pid, code)
        self._clear_pidfile()

    def _clear_pidfile(self) -> None:
        if self._pidfile is not None:
            self._pidfile.clear()

    async def _shutdown(self) -> None:
        self._move(State.STOPPING)
        for record in [*self._in_flight, *self._debouncer.take(float("inf"))]:
            record.finish("failed", 503, self.last_good, "the supervisor is shutting down")
        await asyncio.shield(self._stop_child())
        self._move(State.STOPPED)
        await self._http.aclose()

    async def kill_now(self) -> None:
        """A second shutdown signal: SIGKILL the child group without waiting."""
        for child in (self.child, self._stopping):
            if child is not None:
                await child.kill()

    # ---- helpers -------------------------------------------------------------------------

    def _move(self, state: State) -> None:
        if self.lifecycle.state is not state:
            self.lifecycle.move(state)

    def _health_url(self, config: LlamaConfig) -> str:
        host = host_of(config)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port_of(config)}/health"

    def status(self) -> dict[str, Any]:
        child = self.child
        alive = child is not None and not child.exited.done()
        return {
            "name": self.name,
            "state": self.state.value,
            "pid": child.pid if alive and child else None,
            "port": port_of(self.last_good),
            "restarts": self.restarts,
            "generation": self.generation,
            "uptime_s": round(time.monotonic() - self.ready_since, 3)
            if self.ready_since is not None else None,
            "last_error": self.last_error,
            "pending_changes": self.pending_changes,
            "consecutive_failures": self._history.consecutive_failures,
            "retry_in_s": round(max(0.0, self.retry_at - time.monotonic()), 3)
            if self.retry_at is not None else None,
            "config": config_json(self.last_good),
            "store": self.store.description,
            "store_connected": self.store_connected,
            "fleet": self.fleet,
        }

