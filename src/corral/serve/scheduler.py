"""Carries out :func:`corral.core.placement.plan`: loads, evictions, refusals.

It wakes when poked (a request arrived for a model that is not loaded, a load or an unload
ended) and at least every ``TICK_S``, takes a snapshot of every model, asks the plan, and
starts what it says. Every load and unload runs as a task of its own, so nothing here
waits on a server: requests for loaded models never wait behind another model's load, and
models that fit together load in parallel. One operation per model at a time: a model with
one in progress is not in the plan's hands until it ends (that is the single flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

from corral.core.fit import Estimate
from corral.core.placement import Evict, Limits, Load, ModelState, Phase, Reason, Refuse, plan
from corral.observe.events import Event
from corral.serve.model import RunnableSupervisor, ServedModel

log = logging.getLogger("corral.serve")

TICK_S = 0.1

MakeController = Callable[[ServedModel], Awaitable[RunnableSupervisor]]
Estimator = Callable[[ServedModel], Awaitable[Estimate | None]]


OUT_OF_MEMORY = ("does not fit in memory", "out of memory", "failed to allocate",
                 "cannot allocate memory")


def is_out_of_memory(error: str) -> bool:
    """Whether a failed start's reason (pre-flight's, or llama-server's last lines) says
    memory ran out."""
    lowered = error.lower()
    return any(words in lowered for words in OUT_OF_MEMORY)


def need_of(estimate: Estimate | None, margin: float) -> dict[str, float]:
    """MiB per device (``host``, ``cuda0`` ...), margin included; {} when unknown."""
    if estimate is None:
        return {}
    need: dict[str, float] = {}
    for d in estimate.devices:
        device = d.device.lower()
        need[device] = need.get(device, 0.0) + d.total_mib * (1 + margin)
    return need


class Scheduler:
    def __init__(self, models: Mapping[str, ServedModel], limits: Limits,
                 make_controller: MakeController, estimate: Estimator, *,
                 margin: float, drain_timeout_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.models = models
        self.limits = limits
        self._make = make_controller
        self._estimate = estimate
        self._margin = margin
        self.drain_timeout_s = drain_timeout_s
        self._clock = clock
        self._wake = asyncio.Event()
        self._ops: dict[str, asyncio.Task[None]] = {}
        self._op_phase: dict[str, Phase] = {}
        self._needs: dict[str, dict[str, float]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.evictions: Counter[tuple[str, str]] = Counter()  # (model, reason)

    def poke(self) -> None:
        self._wake.set()

    def need(self, model: ServedModel) -> dict[str, float]:
        return self._needs.get(model.id, {})

    async def run(self) -> None:
        try:
            await self._estimate_all()
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK_S):
                        await self._wake.wait()
                self._wake.clear()
                self.step()
        finally:
            ops = [*self._ops.values(), *self._background]
            for op in ops:
                op.cancel()
            await asyncio.gather(*ops, return_exceptions=True)
            await self.unload_all()

    async def _estimate_all(self) -> None:
        """Every model's estimate before the first placement (cached by the estimator)."""
        for model in list(self.models.values()):
            await self._estimate_one(model)

    async def _estimate_one(self, model: ServedModel) -> None:
        try:
            self._needs[model.id] = need_of(await self._estimate(model), self._margin)
        except Exception as exc:  # an estimate is advice: a model without one still serves
            log.warning("model %s: no memory estimate (%s)", model.id, exc)
            self._needs[model.id] = {}

    def _refresh_estimate(self, model: ServedModel) -> None:
        task = asyncio.get_running_loop().create_task(self._estimate_one(model))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def snapshot(self, now: float) -> list[ModelState]:
        states = []
        for m in self.models.values():
            stats = m.door.stats()
            if stats.in_flight or stats.held_now:
                m.last_used = now
            phase = self._op_phase.get(m.id, m.phase) if m.id in self._ops else m.phase
            states.append(ModelState(
                m.id, phase, self.need(m), in_flight=stats.in_flight, held=stats.held_now,
                oldest_held_s=m.door.timing.longest_wait(),
                idle_s=None if m.last_used is None else now - m.last_used,
                pinned=m.serve.pin, ttl_s=m.serve.ttl_s))
        return states

    def step(self) -> None:
        """One look at every model; start what the plan says."""
        now = self._clock()
        # A model with an operation in progress stays in the plan's figures (a model being
        # unloaded holds its memory and its place until its server is gone) but gets no
        # new action: one operation per model at a time.
        for action in plan(self.snapshot(now), self.limits):
            if action.id in self._ops:
                continue
            if isinstance(action, Load):
                self._spawn(action.id, self._load(self.models[action.id]), Phase.LOADING)
            elif isinstance(action, Evict):
                self._spawn(action.id, self._unload(self.models[action.id], action.reason),
                            Phase.UNLOADING)
            elif isinstance(action, Refuse):
                self._refuse(self.models[action.id], action.why)

    def _spawn(self, model_id: str, work: Awaitable[None], phase: Phase) -> None:
        """Run ``work`` as ``model_id``'s one operation; until it ends the model counts as
        ``phase`` (LOADING: it will hold memory; UNLOADING: it still does)."""
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("model %s: load or unload failed", model_id)
            finally:
                self._ops.pop(model_id, None)
                self._op_phase.pop(model_id, None)
                self.poke()

        self._op_phase[model_id] = phase

        self._ops[model_id] = asyncio.get_running_loop().create_task(run(),
                                                                     name=f"op {model_id}")

    # ---- the operations ---------------------------------------------------------------

    async def _load(self, model: ServedModel) -> None:
        log.info("model %s: loading (%d held)", model.id, model.door.stats().held_now)
        controller = await self._make(model)
        model.start(controller, self._clock(), lambda _: self.poke())
        self._watch_ready(model)

    def _watch_ready(self, model: ServedModel) -> None:
        started = self._clock()

        def on_event(event: Event) -> None:
            if event.kind == "state":
                to, error = event.data.get("to"), str(event.data.get("error") or "")
                if to == "RUNNING":
                    model.room_made = False
                    self._refresh_estimate(model)  # its config may have changed (params)
                if to == "RUNNING" and model.load_started:
                    model.load_seconds.append(self._clock() - started)
                    model.load_started = None
                    log.info("model %s: loaded in %.1f s", model.id, self._clock() - started)
                elif to in ("BACKOFF", "FATAL") and is_out_of_memory(error):
                    self._make_room_once(model, fatal=to == "FATAL")
            self.poke()

        assert model.controller is not None
        model.controller.events.listen(on_event)

    def _make_room_once(self, model: ServedModel, fatal: bool) -> None:
        """A load that failed for lack of memory (the estimate missed, or memory went
        elsewhere): evict the least recently used idle model, once per load, and let the
        supervisor's retry (or, once FATAL, a new load) try again."""
        if model.room_made:
            return
        now = self._clock()
        idle = [s for s in self.snapshot(now)
                if s.id != model.id and s.id not in self._ops and s.phase is Phase.LOADED
                and not s.pinned and s.is_idle(self.limits.idle_grace_s)]
        if not idle:
            log.warning("model %s: out of memory at load, and no idle model to evict",
                        model.id)
            return
        victim = max(idle, key=lambda s: s.idle_s or 0.0)
        model.room_made = True
        log.warning("model %s: out of memory at load; evicting idle model %s and trying "
                    "again once", model.id, victim.id)

        async def evict_then_retry() -> None:
            await self._unload(self.models[victim.id], Reason.MEMORY)
            if fatal:
                await self._restart(model)

        self._spawn(victim.id, evict_then_retry(), Phase.UNLOADING)

    async def _unload(self, model: ServedModel, reason: Reason) -> None:
        stats = model.door.stats()
        log.info("model %s: unloading (%s; %d in flight, %d held)", model.id, reason.value,
                 stats.in_flight, stats.held_now)
        self.evictions[(model.id, reason.value)] += 1
        await model.stop(self.drain_timeout_s)

    def _refuse(self, model: ServedModel, why: str) -> None:
        """Answer what ``model`` holds 503 with ``why``; later requests are held and judged
        again (the limits or the pinned models may have changed by then)."""
        if model.refused != why:
            log.error("%s", why)
        model.refused = why
        model.door.refuse(why)
        model.door.hold()

    # ---- the operator's commands --------------------------------------------------------

    async def load(self, model: ServedModel) -> None:
        """``POST /v1/models/{id}/load``: load now (a FATAL or refused model is tried again)."""
        await self._wait_op(model)
        if model.phase in (Phase.LOADED, Phase.LOADING):
            return
        model.room_made = False
        await self._restart(model)

    async def _restart(self, model: ServedModel) -> None:
        await model.stop(self.drain_timeout_s)  # a FATAL one ends before a new one starts
        model.refused = None
        model.door.hold()
        self._spawn(model.id, self._load(model), Phase.LOADING)
        await self._wait_op(model)

    async def unload(self, model: ServedModel) -> None:
        """``POST /v1/models/{id}/unload``: drain, then stop."""
        await self._wait_op(model)
        self._spawn(model.id, self._unload(model, Reason.ADMIN), Phase.UNLOADING)
        await self._wait_op(model)

    async def _wait_op(self, model: ServedModel) -> None:
        op = self._ops.get(model.id)
        if op is not None:
            await asyncio.shield(op)

    async def unload_all(self) -> None:
        await asyncio.gather(*(m.stop(self.drain_timeout_s) for m in self.models.values()),
                             return_exceptions=True)
