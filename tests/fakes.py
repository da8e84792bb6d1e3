"""In-process fakes of the controller's seams (``corral.supervisor.seams``): time, servers,
checks, routing.

With these the controller runs its real loop, decision table and plans in microseconds,
without a subprocess or a socket. Time moves only when :meth:`FakeClock.run_until` finds
nothing else to do (trio's MockClock "autojump"), so backoff delays and timeouts are exact.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.core.args import FlagCatalog, LlamaConfig
from corral.core.backoff import BackoffPolicy
from corral.core.fit import FitVerdict, SwapMode
from corral.errors import PreflightFailed, StartFailed, StoreUnavailable
from corral.store.base import StoredConfig
from corral.store.memory import MemoryStore
from corral.supervisor.controller import Controller
from corral.supervisor.settings import Settings, Startup

SETTLE_HOPS = 50  # loop iterations that let every ready callback run before time moves


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1.7e9 + self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + max(0.0, seconds), next(self._seq), future))
        self._fire()
        await future

    def _fire(self) -> None:
        while self._timers and (self._timers[0][0] <= self.now or self._timers[0][2].done()):
            _, _, future = heapq.heappop(self._timers)
            if not future.done():
                future.set_result(None)

    def _next_deadline(self) -> float | None:
        live = [t for t in self._timers if not t[2].done()]
        return min(live)[0] if live else None

    async def settle(self) -> None:
        for _ in range(SETTLE_HOPS):
            await asyncio.sleep(0)

    async def run_for(self, seconds: float) -> None:
        """Let ``seconds`` of fake time pass, with everything due in them happening."""
        end = self.now + seconds
        while True:
            await self.settle()
            deadline = self._next_deadline()
            if deadline is None or deadline > end:
                break
            self.now = max(self.now, deadline)
            self._fire()
        self.now = end
        self._fire()
        await self.settle()

    async def run_until(self, condition: Callable[[], object], what: str,
                        max_seconds: float = 3600.0) -> None:
        """Let the loop run, jumping time to the next timer whenever it is idle."""
        limit = self.now + max_seconds
        while True:
            await self.settle()
            if condition():
                return
            deadline = self._next_deadline()
            if deadline is None or deadline > limit:
                raise AssertionError(f"never happened: {what} (fake time {self.now:.3f})")
            self.now = max(self.now, deadline)
            self._fire()


@dataclass
class Behaviour:
    """How a fake llama-server started from a config behaves."""

    load_s: float = 1.0  # until /health answers 200
    outcome: str = "ready"  # "ready", "exit" (code 1 after load_s) or "never"
    ignores_sigterm: bool = False
    spawn_fails: bool = False
    healthy: bool = True  # liveness probes answer 200


class FakeOutput:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def tail(self, n: int = 20) -> list[str]:
        return self.lines[-n:]


Journal = list[tuple[Any, ...]]
"""One ordered record of what the fakes were asked to do, shared by the front door and every
server: ``("front", call, ...)`` and ``("signal", pid, "TERM"|"KILL")``, so a test can say
"closed before stopped"."""


class FakeServer:
    def __init__(self, config: LlamaConfig, pid: int, generation: int,
                 behaviour: Behaviour, clock: FakeClock, journal: Journal | None = None) -> None:
        self.config, self.pid, self.generation = config, pid, generation
        self.behaviour = behaviour
        self.clock = clock
        self.journal: Journal = [] if journal is None else journal
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.output = FakeOutput([f"fake llama-server {pid} loading {config.get('--model')}"])
        self.signals: list[str] = []

    def crash(self, code: int = 1) -> None:
        if not self.exited.done():
            self.output.lines.append(f"fake crash with code {code}")
            self.exited.set_result(code)

    def _signal(self, name: str) -> None:
        self.signals.append(name)
        self.journal.append(("signal", self.pid, name))

    async def stop(self, timeout: float) -> int:
        self._signal("TERM")
        if not self.behaviour.ignores_sigterm:
            self.crash(-15)
        else:
            await asyncio.wait({self.exited, asyncio.ensure_future(self.clock.sleep(timeout))},
                               return_when=asyncio.FIRST_COMPLETED)
        return await self.kill()

    async def kill(self) -> int:
        self._signal("KILL")
        self.crash(-9)
        return self.exited.result()


class FakeLauncher:
    def __init__(self, clock: FakeClock, journal: Journal | None = None) -> None:
        self.clock = clock
        self.journal: Journal = [] if journal is None else journal
        self.servers: list[FakeServer] = []
        self.behave: Callable[[LlamaConfig], Behaviour] = lambda config: Behaviour()
        self._pids = itertools.count(4001)

    async def spawn(self, config: LlamaConfig, generation: int) -> FakeServer:
        behaviour = self.behave(config)
        if behaviour.spawn_fails:
            raise StartFailed(f"cannot execute {config.binary}: fake spawn failure")
        server = FakeServer(config, next(self._pids), generation, behaviour, self.clock,
                            self.journal)
        self.servers.append(server)
        return server

    async def wait_ready(self, server: FakeServer, timeout_s: float,  # type: ignore[override]
                         min_healthy_s: float,
                         on_healthy: Callable[[], None] | None = None) -> float:
        b = server.behaviour
        load = b.load_s if b.outcome != "never" else float("inf")
        if not await self._survives(server, min(load, timeout_s)):
            raise StartFailed(f"llama-server exited with code {server.exited.result()}",
                              server.output.tail())
        if b.outcome == "exit":
            server.crash(1)
            raise StartFailed("llama-server exited with code 1", server.output.tail())
        if load > timeout_s:
            raise StartFailed(f"llama-server did not become ready within {timeout_s:g} s")
        if on_healthy is not None:
            on_healthy()
        if not await self._survives(server, min_healthy_s):
            raise StartFailed(f"llama-server exited with code {server.exited.result()}",
                              server.output.tail())
        return load + min_healthy_s

    async def _survives(self, server: FakeServer, seconds: float) -> bool:
        timer = asyncio.ensure_future(self.clock.sleep(seconds))
        await asyncio.wait({server.exited, timer}, return_when=asyncio.FIRST_COMPLETED)
        timer.cancel()
        return not server.exited.done()

    async def probe(self, server: FakeServer) -> bool:  # type: ignore[override]
        return server.behaviour.healthy and not server.exited.done()

    async def aclose(self) -> None:
        pass

    def alive(self) -> list[FakeServer]:
        return [s for s in self.servers if not s.exited.done()]


@dataclass
class FakeChecks:
    """Pre-flight that rejects the models named in ``bad_models``."""

    bad_models: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)
    fits: bool = True  # what side_by_side answers

    async def catalog(self, binary: str) -> FlagCatalog:
        return FlagCatalog()

    def admit_binary(self, binary: str) -> None:
        pass

    async def admit(self, config: LlamaConfig) -> None:
        pass

    async def check(self, config: LlamaConfig, running: LlamaConfig | None, *,
                    fit: bool = True) -> None:
        self.calls.append("check")
        model = config.get("--model")
        if model in self.bad_models:
            raise PreflightFailed(f"model file {model!r} does not exist")

    async def check_port(self, config: LlamaConfig) -> None:
        self.calls.append("port")

    async def fit(self, config: LlamaConfig, running: LlamaConfig | None) -> FitVerdict:
        return FitVerdict(True, "fake memory check", known=False)

    def warnings(self, config: LlamaConfig) -> list[str]:
        return []

    def memory_view(self, config: LlamaConfig) -> dict[str, Any] | None:
        return None

    def side_by_side(self, running: LlamaConfig, new: LlamaConfig) -> FitVerdict:
        return FitVerdict(self.fits, "fake memory check")


class FakeFront:
    """Records how the controller steers the front door (in ``calls`` and the journal)."""

    def __init__(self, journal: Journal | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.journal: Journal = [] if journal is None else journal
        self.routed_to: int | None = None
        self.mode = "hold"

    def _record(self, call: tuple[Any, ...]) -> None:
        self.calls.append(call)
        self.journal.append(("front", *call))

    def route_to(self, server: Any) -> None:
        self._record(("route", server.pid))
        self.routed_to, self.mode = server.pid, "route"

    def hold(self) -> None:
        self._record(("hold",))
        self.routed_to, self.mode = None, "hold"

    def refuse(self, reason: str) -> None:
        self._record(("refuse", reason))
        self.routed_to, self.mode = None, "refuse"

    async def drain(self, server: Any, timeout_s: float) -> int:
        self._record(("drain", server.pid))
        return 0

    async def close(self, drain_timeout_s: float) -> None:
        self._record(("close",))

    def view(self) -> dict[str, Any] | None:
        return {"mode": self.mode}


class FlakyStore(MemoryStore):
    """A memory store whose next saves fail with ``fail_with``."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_with: Exception | None = None

    async def save(self, name: str, stored: StoredConfig) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        await super().save(name, stored)


def config(model: str = "a.gguf", **flags: str) -> LlamaConfig:
    args = {"--model": model, "--port": "8081", **{f"--{k}": v for k, v in flags.items()}}
    return LlamaConfig("/usr/bin/llama-server", tuple(args.items()))


FAST = Settings(debounce_s=0.2, max_batch_age_s=2.0, min_healthy_s=0.3, stop_timeout_s=10.0,
                ready_timeout_s=300.0, backoff=BackoffPolicy(max_failures=5), echo_output=False)


class Rig:
    """A controller on fakes, running in a task; ``async with Rig(...) as rig``."""

    def __init__(self, startup: Startup | None = None, settings: Settings = FAST,
                 swap: SwapMode = SwapMode.STOP_FIRST) -> None:
        self.clock = FakeClock()
        self.journal: Journal = []  # front-door calls and server signals, in order
        self.launcher = FakeLauncher(self.clock, self.journal)
        self.checks = FakeChecks()
        self.front = FakeFront(self.journal)
        self.store = FlakyStore()
        settings = Settings(**{**settings.__dict__, "swap": swap})
        self.controller = Controller(
            "default", self.store, startup or Startup(config(), persist_when_ready=True),
            settings, launcher=self.launcher, checks=self.checks, clock=self.clock,
            front=self.front)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Rig:
        self.task = asyncio.create_task(self.controller.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await self.clock.run_until(self.task.done, "the controller stopped")
        if not self.task.cancelled() and self.task.exception() is not None:
            raise self.task.exception()  # type: ignore[misc]

    @property
    def state(self) -> str:
        return self.controller.state.value

    async def until_state(self, state: str, max_seconds: float = 3600.0) -> None:
        await self.clock.run_until(lambda: self.state == state, f"state {state}", max_seconds)

    @property
    def active(self) -> FakeServer:
        servers = self.launcher.alive()
        assert servers, "no live server"
        return servers[-1]

    def store_unavailable(self) -> None:
        self.store.fail_with = StoreUnavailable("etcd at 127.0.0.1:1 is unreachable")
