"""The one owner of llama-server processes: applies, revivals and shutdown, one at a time.

Theory of operation
-------------------
HTTP handlers only validate and *submit* a change; it joins the open batch of the
:class:`~corral.core.debounce.Debouncer` and the handler awaits the batch's outcome. This
task loops: it waits until something happens (a batch is due, the active server exits, a
backoff delay ends, a liveness probe answers), turns it into an
:class:`~corral.core.decide.Event`, and carries out what the decision table says for the
current state. Actions that take time (a start, an apply) end by feeding the next event
back. Because nothing else touches the servers, a revival can never run in the middle of
an apply.

An apply runs the steps :func:`~corral.core.steps.plan_batch` lays out, carried out by
:class:`~corral.supervisor.apply.PlanExecutor`, which returns what happened (only this class
writes the supervisor's state); what a failure means is again the table's call. Time and
processes come through seams (:mod:`corral.supervisor.seams`): the loop runs in-process in
tests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from corral.child.pidfile import PidFile
from corral.core.args import Change, LlamaConfig
from corral.core.backoff import StartHistory
from corral.core.decide import (
    Action,
    Event,
    State,
    apply_failure_event,
    decide,
    failed_apply_gives_up,
    is_serving,
    liveness_due,
    needs_preflight,
    start_failure_event,
    start_failure_reason,
)
from corral.core.steps import (
    RESTART_SOURCE,
    Plan,
    Slot,
    Strategy,
)
from corral.errors import PreflightFailed, StartFailed, StoreError
from corral.observe.events import EventBus
from corral.store.base import ConfigStore, StoredConfig
from corral.supervisor.apply import PlanExecutor, Verdict
from corral.supervisor.batching import swap_for, take
from corral.supervisor.boot import boot
from corral.supervisor.changes import (
    ChangeRecord,
    Outcome,
)
from corral.supervisor.inbox import Inbox
from corral.supervisor.liveness import Liveness
from corral.supervisor.seams import Checks, Clock, Front, Launcher, NoFront, Server, SystemClock
from corral.supervisor.settings import Settings, Startup
from corral.supervisor.slots import Slots
from corral.supervisor.start import Starter
from corral.supervisor.status import Status, status_of

log = logging.getLogger("corral")

RESTART = RESTART_SOURCE


class Controller:
    def __init__(self, name: str, store: ConfigStore, startup: Startup, settings: Settings, *,
                 launcher: Launcher, checks: Checks, clock: Clock | None = None,
                 front: Front | None = None, pidfile: PidFile | None = None,
                 pinned: dict[str, str] | None = None,
                 place: Callable[[LlamaConfig], LlamaConfig] | None = None,
                 events: EventBus | None = None) -> None:
        self.name = name
        self.events = events or EventBus()  # what happened, for streams, metrics and audit
        self.store = store
        self.settings = settings
        self.checks = checks
        self.clock = clock or SystemClock()
        self.front = front or NoFront()
        self.pinned = pinned or {}  # flag -> why the API may not change it
        self.place = place or (lambda config: config)  # --listen: a loopback port per start
        self.last_good = startup.preferred
        self.proven: LlamaConfig | None = None  # the last config that became ready
        self.state = State.STOPPED
        self.slots = Slots(launcher, self.clock, pidfile)
        self.history = StartHistory()
        self.restarts = 0
        self.last_error: str | None = None
        self.ready_since: float | None = None
        self.retry_at: float | None = None
        self.last_strategy: str | None = None
        self.fleet: dict[str, Any] | None = None  # set by corral.fleet when in a fleet
        self._launcher = launcher
        self._startup = startup
        self._pidfile = pidfile
        self._inbox = Inbox(settings, self.clock, self.events)
        self.liveness = Liveness(launcher, self.clock, settings.liveness_interval_s,
                                 settings.liveness_failures)
        self._batch: list[ChangeRecord] = []  # the batch being applied
        self._plan: Plan | None = None
        self._prior = State.STOPPED  # the state the batch found
        self._starter = Starter(self.slots, launcher, checks, self.front, settings, self.events,
                                self.place, on_active=self.became_active)
        self._executor = PlanExecutor(name, self.slots, self.front, store, settings,
                                      self._starter, on_switched=self.became_active,
                                      on_active_stopped=self._active_stopped)
        self._verdict = Verdict()  # how the batch being applied ends, once known
        self._killed_hung = False  # the next exit is a hang's, not a crash
        self._actions: dict[Action, Callable[[], Awaitable[Event | None]]] = {
            Action.START_BOOT: self._start_boot, Action.START: self._start_last_good,
            Action.FORGET_FAILURES: self._forget_failures,
            Action.SCHEDULE_RETRY: self._schedule_retry, Action.CANCEL_RETRY: self._cancel_retry,
            Action.COUNT_RESTART: self._count_restart, Action.KILL: self._kill_hung,
            Action.HOLD: self._hold, Action.REFUSE: self._refuse,
            Action.RUN_PLAN: self._run_plan, Action.ANSWER: self._answer,
            Action.ANSWER_PENDING: self._answer_pending, Action.CLOSE_FRONT: self._close_front,
            Action.STOP_ALL: self._stop_all}

    # ---- what the API calls -------------------------------------------------------------

    def submit(self, change: Change, source: str = "api",
               client: str | None = None) -> ChangeRecord:
        """Add ``change`` to the open batch; ``source`` says who asked (api, fleet, restart,
        revert, reload), ``client`` the API client's address (both for the audit log)."""
        return self._inbox.submit(change, source, client)

    def restart(self, client: str | None = None) -> ChangeRecord:
        """Restart llama-server with the config in effect (out of BACKOFF and FATAL too): a
        batch like any other (never beside an apply) whose plan runs though it changes
        nothing, not stored again; merged with real changes, it is simply their apply."""
        return self.submit(Change(None, ()), source=RESTART, client=client)

    def record(self, change_id: str) -> ChangeRecord | None:
        return self._inbox.record(change_id)

    @property
    def store_connected(self) -> bool:
        """False while a networked store (etcd) is known to be unreachable."""
        return bool(getattr(self.store, "is_connected", True))

    @property
    def pending_changes(self) -> int:
        return self._inbox.pending

    async def check(self, config: LlamaConfig, *, fit: bool = True) -> None:
        """Pre-flight ``config`` against what runs now; raise PreflightFailed."""
        active = self.active_server()
        await self.checks.check(config, active.config if active else None, fit=fit)

    def status(self) -> Status:
        return status_of(self)

    def active_server(self) -> Server | None:
        return self.slots.live(Slot.ACTIVE)

    def report_fleet(self, view: dict[str, Any] | None) -> None:
        self.fleet = view

    # ---- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if self._pidfile is not None:
                self._pidfile.kill_stale()
            await self._handle(Event.BOOT)
            while True:
                event = await self._next_event()
                if event is not None:
                    await self._handle(event)
        finally:
            await asyncio.shield(self._shutdown())

    async def _handle(self, event: Event) -> None:
        """Look the event up in the table, move, act; then handle what the actions led to."""
        while True:
            decision = decide(self.state, event)
            if decision.next is not self.state:
                self.events.emit("state", **{"from": self.state.value,
                                             "to": decision.next.value,
                                             # a past error would read as this
                                             # transition's cause once serving again
                                             "error": None if is_serving(decision.next)
                                             else self.last_error})
            self.state = decision.next
            follow_up = None
            for action in decision.actions:
                follow_up = await self._actions[action]() or follow_up
            if follow_up is None:
                return
            event = follow_up

    async def _next_event(self) -> Event | None:
        await self._wait_for_work()
        now = self.clock.monotonic()
        if (reaped := await self.slots.reap(Slot.ACTIVE)) is not None:
            self._on_exit(*reaped)
            return Event.CRASHED
        if self.retry_at is not None and now >= self.retry_at:
            self.retry_at = None
            return Event.RETRY_DUE
        if self._inbox.batches.is_due(now):
            return await self._take_batch(now)
        if self.liveness.probe is not None and self.liveness.probe.done():
            hung = self.liveness.take_result() and self.slots.live(Slot.ACTIVE) is not None
            return Event.HUNG if hung else None
        if self.liveness.due is not None and now >= self.liveness.due:
            active = self.slots.live(Slot.ACTIVE)
            if active is not None and liveness_due(self.state):
                self.liveness.start(active)
        return None

    async def _wait_for_work(self) -> None:
        wake = asyncio.ensure_future(self._inbox.wake.wait())
        waits: set[asyncio.Future[Any]] = {wake}
        if (active := self.slots[Slot.ACTIVE]) is not None:
            waits.add(active.exited)
        if self.liveness.probe is not None:
            waits.add(self.liveness.probe)
        deadlines = [d for d in (self._inbox.batches.deadline(), self.retry_at,
                                 self.liveness.due) if d is not None]
        timer = None
        if deadlines:
            delay = max(0.0, min(deadlines) - self.clock.monotonic())
            timer = asyncio.ensure_future(self.clock.sleep(delay))
            waits.add(timer)
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for own in (wake, timer):
                if own is not None:
                    own.cancel()
        self._inbox.wake.clear()

    def _on_exit(self, server: Server, code: int, ran_s: float) -> None:
        self.liveness.cancel()
        self.ready_since = None
        tail = " | ".join(server.output.tail(5))
        self.last_error = (f"llama-server exited with code {code} after {ran_s:.1f} s"
                           + (f": {tail}" if tail else ""))
        reason, self._killed_hung = ("hang" if self._killed_hung else "crash"), False
        self.events.emit("crash", reason=reason, pid=server.pid, code=code,
                         ran_s=round(ran_s, 3), error=self.last_error)
        log.error("%s; reviving with the last good config", self.last_error)

    async def _take_batch(self, now: float) -> Event:
        batch = self._inbox.batches.take(now)
        taken = await take(batch, self.last_good, self.state, self.check, self.strategy_for,
                           self.settings.swap)
        self._batch, self._plan, self._verdict = batch, taken.plan, taken.verdict
        self._prior = self.state
        return taken.event

    def strategy_for(self, desired: LlamaConfig, restart: bool = False) -> tuple[Strategy, str]:
        """How an apply of ``desired`` (or a restart) would swap servers now, and why."""
        return swap_for(self.settings.swap, self.slots.live(Slot.ACTIVE), self.last_good,
                        desired, restart, self.checks)

    # ---- starting ------------------------------------------------------------------------

    def became_active(self) -> None:
        self.ready_since = self.clock.monotonic()
        self.liveness.restart()

    def _active_stopped(self) -> None:
        self.ready_since = None

    async def _start_config(self, config: LlamaConfig) -> None:
        # Without pre-flight (needs_preflight says why), the binary rule still costs a
        # realpath: a program swapped behind an allowed symlink is not revived either.
        if needs_preflight(config, self.proven):
            await self.check(config)
        else:
            self.checks.admit_binary(config.binary)
        await self._starter.start_in(Slot.ACTIVE, config)
        await self._starter.await_ready(Slot.ACTIVE)
        self.proven = config

    async def _start_boot(self) -> Event:
        ran, error = await boot(self._startup.candidates(), self._start_config, self.clock,
                                self.events)
        if ran is None:
            return self._start_failed(error or "no config to start")
        if ran != self.last_good:
            log.warning("running the command-line config; the stored config is kept "
                        "until another config is applied successfully")
        self.last_good = ran
        if self._startup.persist_when_ready:
            await self._persist_quietly(ran)
        return Event.READY

    async def _start_last_good(self) -> Event:
        try:
            await self._start_config(self.last_good)
        except (StartFailed, PreflightFailed) as exc:
            return self._start_failed(str(exc))
        return Event.READY

    async def _persist_quietly(self, config: LlamaConfig) -> None:
        try:
            await self.store.save(self.name, StoredConfig.now(config))
        except StoreError as exc:
            log.error("could not store the running config: %s", exc)

    def _start_failed(self, reason: str) -> Event:
        reason = start_failure_reason(self.state, self._verdict.error, reason)
        if self.state is State.ROLLING_BACK:
            self._verdict.error = reason  # the change's answer says both
        self.last_error = reason
        failures = self.history.failed()
        gives_up = self.settings.backoff.delay_after(failures) is None
        if gives_up:
            log.error("llama-server failed to start %d times in a row: FATAL; apply a new "
                      "config to try again. Last error: %s", failures, reason)
        return start_failure_event(gives_up)

    # ---- actions -------------------------------------------------------------------------

    async def _forget_failures(self) -> None:
        self.history.succeeded()

    async def _schedule_retry(self) -> None:
        failures = self.history.consecutive_failures
        delay = self.settings.backoff.delay_after(failures) or 0.0
        log.warning("start failed (%d in a row); retrying in %.1f s", failures, delay)
        self.retry_at = self.clock.monotonic() + delay

    async def _cancel_retry(self) -> None:
        self.retry_at = None

    async def _count_restart(self) -> None:
        self.restarts += 1

    async def _kill_hung(self) -> None:
        active = self.slots.live(Slot.ACTIVE)
        if active is not None:
            log.error("llama-server (pid %d) failed %d health checks in a row: restarting it",
                      active.pid, self.liveness.misses)
            self._killed_hung = True
            await active.kill()  # the loop sees the exit and revives it

    async def _hold(self) -> None:
        self.front.hold()

    async def _refuse(self) -> None:
        self.front.refuse(f"llama-server is FATAL: {self.last_error}")

    async def _run_plan(self) -> Event:
        plan = self._plan
        assert plan is not None
        self.last_strategy = plan.strategy.value
        applied = await self._executor.run(plan, len(self._batch))
        self._verdict = applied.verdict
        if applied.ok:
            self.last_good = self.proven = plan.desired
            self.last_error = None
            return Event.APPLIED
        self.last_error = applied.verdict.error
        next_delay = self.settings.backoff.delay_after(self.history.consecutive_failures)
        return apply_failure_event(applied.old_serving, applied.had_old,
                                   failed_apply_gives_up(self._prior, next_delay))

    async def _answer(self) -> None:
        v, ran = self._verdict, self._plan is not None  # no plan: a no-op, or pre-flight's no
        for record in self._batch:
            record.finish(v.outcome, self.last_good, v.error, v.log,
                          restarted=ran and v.outcome is Outcome.APPLIED,
                          strategy=self.last_strategy if ran else None)
        self._verdict = Verdict()
        self._batch, self._plan = [], None

    async def _answer_pending(self) -> None:
        for record in [*self._batch, *self._inbox.batches.take(float("inf"))]:
            record.finish(Outcome.UNAVAILABLE, self.last_good, "the supervisor is shutting down")

    async def _close_front(self) -> None:
        await self.front.close(self.settings.drain_timeout_s)

    async def _stop_all(self) -> Event:
        self.liveness.cancel()
        self.ready_since = None
        await self.slots.stop_all(self.settings.stop_timeout_s)
        return Event.STOPPED

    # ---- stopping ------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        if self.state is not State.STOPPING:
            await self._handle(Event.SHUTDOWN)
        await self._launcher.aclose()

    async def kill_now(self) -> None:
        """A second shutdown signal: SIGKILL every server group without waiting."""
        await self.slots.kill_all()
