"""A simulated fleet that runs the shipped code: N supervisors on one in-memory etcd.

Each member is what ``corral supervise --config-driver etcd --local-port`` builds (see
``corral.app.supervise``): a real :class:`~corral.supervisor.controller.Controller` on fake
llama-servers (``tests/fakes.py``), behind a real :class:`~corral.fleet.PublishingStore`
and :class:`~corral.store.local.LocalStore`, started with the real
:func:`~corral.supervisor.startup.choose_startup` (so :func:`~corral.fleet.load_for_start`
runs), and the real :class:`~corral.fleet.FleetSync` with its
:class:`~corral.fleet.rollout.RolloutAgent` and registration, all talking to
:class:`tests.memory_etcd.MemoryEtcd` through a client of their own that adds latency and
watch lag. Time is virtual (``VirtualTimeLoop``), so a schedule of minutes runs in
milliseconds.

Models name what a fake llama-server does with them: ``good-*`` starts, ``bad-*`` fails
pre-flight (a truncated GGUF), ``crash-*`` exits while loading.

:meth:`Sim.check` states what a rollout promises (issue 18): the key ends on the last write
(or its revert target if it failed), each failed write was tried by at most one instance
with a canary, the record ends ``done`` or ``failed``, every live instance runs the key's
config, and no supervisor ever overwrote a write that had not become a rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.core.args import Change, LlamaConfig
from corral.core.backoff import BackoffPolicy
from corral.core.decide import State
from corral.core.rollout import MaxUnavailable, Phase, Rollout
from corral.errors import StoreUnavailable
from corral.fleet import FleetSync, PublishingStore
from corral.fleet.rollout import RolloutSettings
from corral.store.etcd import EtcdStore
from corral.store.etcd.codec import decode_config
from corral.store.etcd.wire import Op, WatchEvent
from corral.store.local import LocalOverrides, LocalStore
from corral.supervisor.changes import ChangeRecord
from corral.supervisor.controller import Controller
from corral.supervisor.settings import Settings
from corral.supervisor.startup import choose_startup
from tests.fakes import Behaviour, FakeChecks, FakeLauncher
from tests.memory_etcd import LoopClock, MemoryClient, MemoryEtcd
from tests.waiting import until

NAME = "f"
CONFIG_KEY = f"/corral/configs/{NAME}"
ROLLOUT_KEY = f"/corral/rollouts/{NAME}"
SLOTS = f"/corral/slots/{NAME}/"
INSTANCES = f"/corral/instances/{NAME}/"
BINARY = "/usr/bin/llama-server"
OPERATOR = "operator"

SETTINGS = Settings(debounce_s=0.05, max_batch_age_s=1.0, min_healthy_s=0.2,
                    stop_timeout_s=5.0, ready_timeout_s=30.0,
                    backoff=BackoffPolicy(max_failures=5), echo_output=False)


def config_of(model: str, port: int | None = None) -> LlamaConfig:
    args: list[tuple[str, str]] = [("--model", model)]
    if port is not None:
        args.append(("--port", str(port)))
    return LlamaConfig(BINARY, tuple(args))


def stored_value(model: str) -> str:
    """What an operator's ``etcdctl put`` of ``model`` stores."""
    return json.dumps({"binary": BINARY, "args": [["--model", model]]})


def model_of(value: str | bytes | None) -> str | None:
    if value is None:
        return None
    raw = value.encode() if isinstance(value, str) else value
    return str(decode_config(raw, CONFIG_KEY).config.get("--model"))


def behaviour(config: LlamaConfig) -> Behaviour:
    model = str(config.get("--model"))
    return Behaviour(load_s=0.5, outcome="exit" if model.startswith("crash") else "ready")


@dataclass
class Member:
    name: str
    port: int
    client: MemoryClient
    controller: Controller
    fleet: FleetSync
    launcher: FakeLauncher
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    alive: bool = True
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # set when it is killed

    @property
    def model(self) -> str | None:
        """What its llama-server runs, once ready (None while it is not serving)."""
        c = self.controller
        return str(c.last_good.get("--model")) if c.state is State.RUNNING else None

    @property
    def tried(self) -> list[str]:
        """Every model a llama-server was started with here, in order."""
        return [str(s.config.get("--model")) for s in self.launcher.servers]


class Sim:
    """N members and one etcd, driven by a seeded random source; see the module doc."""

    def __init__(self, seed: int, *, max_unavailable: MaxUnavailable | None = None,
                 canary_seconds: float = 1.0, lag: float = 0.05, latency: float = 0.005) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.etcd = MemoryEtcd()
        self.rollout = RolloutSettings(max_unavailable or MaxUnavailable(1), canary_seconds)
        self.lag, self.latency = lag, latency
        self.members: dict[str, Member] = {}
        self.trace: list[str] = []
        self.records: list[Rollout] = []  # every rollout record written, in order
        self._following = False
        self.final: dict[str, str | None] = {}  # what each live member ran at shutdown
        self.fails_on: dict[str, set[str]] = {}  # member -> models that fail pre-flight there

    # ---- the world ------------------------------------------------------------------------

    def log(self, line: str) -> None:
        now = asyncio.get_running_loop().time()
        self.trace.append(f"t={now:7.3f} {line}")

    def put(self, model: str) -> int:
        """An operator's ``etcdctl put`` of the fleet config; returns its revision."""
        result = self.etcd.txn([], [Op.put(CONFIG_KEY, stored_value(model))], [], OPERATOR)
        self.log(f"operator puts {model} at revision {result.revision}")
        return result.revision

    async def start(self, n: int, model: str = "good-0") -> None:
        """Start ``n`` members from the command-line config ``model``; wait until the
        first config is stored and every member runs it."""
        for revision, event in self.etcd.history:
            self._follow_record(revision, event)
        self.etcd.listeners.append(self._follow_record)
        self._following = True
        for _ in range(n):
            await self.add(model)
        await self.until(lambda: self.quiet(), 60, "the first config stored, all in sync")

    async def add(self, model: str = "good-0") -> Member:
        name = f"i{len(self.members)}"
        port = 9000 + len(self.members)
        client = MemoryClient(self.etcd, name, random.Random(self.rng.random()),
                              self.latency, self.lag)
        etcd = EtcdStore(client)
        publisher = PublishingStore(etcd, NAME, name, self.rollout)
        from_cli = config_of(model, port)
        store = LocalStore(publisher, LocalOverrides.from_config(from_cli))
        startup = await choose_startup(store, NAME, from_cli, fleet=True)
        launcher = FakeLauncher(LoopClock())  # type: ignore[arg-type]
        launcher.behave = behaviour
        checks = FakeChecks(bad_models={f"bad-{k}{api}" for k in range(100)
                                        for api in ("", "-api")} | self.fails_on.get(name, set()))
        controller = Controller(NAME, store, startup, SETTINGS, launcher=launcher,
                                checks=checks, clock=LoopClock())
        fleet = FleetSync(controller, store, etcd, NAME, f"127.0.0.1:{port}", self.rollout,
                          name)
        member = Member(name, port, client, controller, fleet, launcher)
        member.tasks = [asyncio.create_task(controller.run(), name=f"{name} controller"),
                        asyncio.create_task(fleet.run(), name=f"{name} fleet")]
        self.members[name] = member
        self.log(f"{name} starts with {model}")
        return member

    async def kill(self, name: str) -> None:
        """SIGKILL: the member stops at once; its lease expires later, taking its keys."""
        member = self.members[name]
        member.client.partition()  # nothing it sends on the way down reaches etcd
        for task in member.tasks:
            task.cancel()
        await asyncio.gather(*member.tasks, return_exceptions=True)
        member.alive = False
        member.gone.set()
        self.log(f"{name} killed")

    def partition(self, name: str) -> None:
        self.members[name].client.partition()
        self.log(f"{name} cut off from etcd")

    def heal(self, name: str) -> None:
        self.members[name].client.heal()
        self.log(f"{name} reaches etcd again")

    async def api_change(self, name: str, model: str) -> ChangeRecord | None:
        """``POST /v1/params {"args": {"--model": model}}`` to member ``name`` (None: 503,
        etcd could not be reached to take a slot)."""
        member = self.members[name]
        self.log(f"API change to {model} posted to {name}")
        try:
            record = await member.fleet.begin(Change(None, (("--model", model),)))
        except StoreUnavailable as exc:
            self.log(f"API change to {model} on {name}: 503 {exc}")
            return None
        # A member killed meanwhile never answers (the client's connection is reset).
        gone = asyncio.ensure_future(member.gone.wait())
        await asyncio.wait({record.done, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not record.done.done():
            self.log(f"API change to {model} on {name}: no answer, the member was killed")
            return None
        self.log(f"API change to {model} on {name}: {record.outcome.value} {record.error}")
        return record

    async def shutdown(self) -> None:
        self.final = {m.name: m.model for m in self.live}
        if self._following:
            self.etcd.listeners.remove(self._follow_record)
            self._following = False
        for member in self.members.values():
            for task in member.tasks:
                task.cancel()
        await asyncio.gather(*(t for m in self.members.values() for t in m.tasks),
                             return_exceptions=True)

    def _follow_record(self, revision: int, event: WatchEvent) -> None:
        """Every record written, for the invariants: called by the etcd as each event
        happens (a test-side watch with no lag; a task polling the history every 1 ms
        instead made half of all the loop's turns)."""
        if event.kind == "PUT" and event.kv.key == ROLLOUT_KEY:
            with contextlib.suppress(ValueError, KeyError):
                r = Rollout.from_json(json.loads(event.kv.value))
                self.records.append(r)
                self.log(f"record at {revision}: revision {r.revision} "
                         f"{model_of(r.config)} {r.phase.value} canary={r.canary} "
                         f"progress={dict(r.progress)} good={model_of(r.good)}")
        elif event.kv.key == CONFIG_KEY and event.kind == "PUT":
            who = next((w for rev, w, k, _ in self.etcd.writes
                        if rev == revision and k == CONFIG_KEY), "?")
            self.log(f"key at {revision}: {model_of(event.kv.value)} by {who}")

    # ---- waiting --------------------------------------------------------------------------

    async def until(self, condition: Callable[[], object], seconds: float, what: str) -> None:
        """:func:`tests.waiting.until`, failing also when a member's task failed, and
        explaining the fleet's history when it times out."""
        def holds() -> object:
            for member in self.live:
                for task in member.tasks:
                    if task.done() and not task.cancelled() and task.exception():
                        raise AssertionError(f"{task.get_name()} failed: "
                                             f"{task.exception()!r}") from task.exception()
            return condition()

        await until(holds, seconds, what, interval=0.05, explain=self.explain)

    async def run_for(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    # ---- the facts ------------------------------------------------------------------------

    @property
    def live(self) -> list[Member]:
        return [m for m in self.members.values() if m.alive]

    @property
    def key_model(self) -> str | None:
        return model_of(self.etcd.value(CONFIG_KEY))

    @property
    def key_revision(self) -> int:
        kv = self.etcd.kvs.get(CONFIG_KEY)
        return kv.mod_revision if kv else 0

    @property
    def record(self) -> Rollout | None:
        raw = self.etcd.value(ROLLOUT_KEY)
        return Rollout.from_json(json.loads(raw)) if raw else None

    def quiet(self) -> bool:
        """The record of the key's config ended, every live member runs the key's config,
        nobody holds a slot, and nothing is left in any controller's hands."""
        r, key = self.record, self.key_model
        if r is None or key is None:
            return False
        ended = ((r.revision == self.key_revision and r.phase is Phase.DONE
                  and {m.name for m in self.live} <= set(r.progress))
                 or (r.phase is Phase.FAILED and r.revision < self.key_revision))
        registered = {k[len(INSTANCES):] for k in self.etcd.kvs if k.startswith(INSTANCES)}
        return (ended and all(m.model == key for m in self.live)
                and registered == {m.name for m in self.live}
                and not any(k.startswith(SLOTS) for k in self.etcd.kvs)
                and all(m.controller.pending_changes == 0 for m in self.live))

    def explain(self) -> str:
        running = {m.name: (m.model, m.controller.state.value) for m in self.live}
        return (f"seed {self.seed}; key {self.key_model}@{self.key_revision}; record "
                f"{self.record}; running {running}\n" + "\n".join(self.trace[-120:]))
