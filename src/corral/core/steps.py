"""An apply as a plan of steps: what runs, in which order, for each swap strategy.

The controller keeps two *slots*: ``ACTIVE`` (the server clients are routed to) and
``CANDIDATE`` (a server warming up beside it). A plan names steps on slots; the executor
knows how to do each step and nothing about strategies, so a new strategy is a new plan.

- stop-first: Hold, Drain(active), Stop(active), Start(new -> active), AwaitReady(active),
  Persist. Two models never share memory; clients are held (with the front door) or see a
  closed port (without) while the new one loads.
- start-first: Start(new -> candidate), AwaitReady(candidate), Persist, Switch,
  Drain(candidate), Stop(candidate). The old server serves until the new one is ready;
  a new config that fails is simply killed. Persist comes *before* Switch (unlike a
  textbook blue/green): a store that cannot be written rejects the change while the old
  server was never touched.
- from nothing (backoff, FATAL): Start(new -> active), AwaitReady(active), Persist.

Answering the batch is not a step: the decision table answers, after success or failure.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from corral.core.args import Change, LlamaConfig, apply_change, merge_changes


class Slot(enum.StrEnum):
    ACTIVE = "active"
    CANDIDATE = "candidate"


class Strategy(enum.StrEnum):
    STOP_FIRST = "stop-first"
    START_FIRST = "start-first"


@dataclass(frozen=True)
class Hold:
    """Front door: hold new requests until an active server is ready again."""


@dataclass(frozen=True)
class Drain:
    """Wait until the server in ``slot`` has no request in flight (bounded)."""

    slot: Slot


@dataclass(frozen=True)
class Stop:
    slot: Slot


@dataclass(frozen=True)
class Start:
    config: LlamaConfig
    slot: Slot


@dataclass(frozen=True)
class AwaitReady:
    slot: Slot


@dataclass(frozen=True)
class Switch:
    """Route new requests to the candidate; the old active server becomes the candidate."""


@dataclass(frozen=True)
class Persist:
    config: LlamaConfig


Step = Hold | Drain | Stop | Start | AwaitReady | Switch | Persist


@dataclass(frozen=True)
class Plan:
    desired: LlamaConfig
    steps: tuple[Step, ...]
    strategy: Strategy
    is_noop: bool


RESTART_SOURCE = "restart"  # a change that is a restart (POST /v1/restart)
FLEET_SOURCE = "fleet"  # a fleet config another supervisor (or etcdctl) stored


def batch_kind(sources: Sequence[str]) -> tuple[bool, bool]:
    """(persist, restart) of a batch whose changes came from ``sources``: a fleet config is
    stored already and a restart stores nothing new; any restart in it makes the plan run
    even if the config stays the same."""
    persist = any(s not in (FLEET_SOURCE, RESTART_SOURCE) for s in sources)
    return persist, RESTART_SOURCE in sources


def desired_config(last_good: LlamaConfig, batch: Sequence[Change]) -> LlamaConfig:
    """``last_good ⊕ merged batch``; ``last_good`` itself if that changes nothing."""
    desired = apply_change(last_good, merge_changes(batch))
    # Same flags and values in another order is still the same server: no restart.
    same = (desired.binary == last_good.binary and desired.as_dict() == last_good.as_dict()
            and dict(desired.env) == dict(last_good.env))
    return last_good if same else desired


def plan_batch(last_good: LlamaConfig, is_serving: bool, batch: Sequence[Change],
               strategy: Strategy = Strategy.STOP_FIRST, persist: bool = True) -> Plan:
    """The steps that turn ``last_good`` into ``last_good ⊕ merged batch``.

    A no-op only while a server is up with exactly that config; in backoff or FATAL the same
    config is started again (that is how a user retries). ``persist`` is False for a config
    that came from the store (a fleet peer's write is stored already).
    """
    desired = desired_config(last_good, batch)
    same = desired is last_good
    store: tuple[Step, ...] = (Persist(desired),) if persist else ()
    if not is_serving:
        steps = (Start(desired, Slot.ACTIVE), AwaitReady(Slot.ACTIVE), *store)
        return Plan(desired, steps, Strategy.STOP_FIRST, is_noop=False)
    if strategy is Strategy.START_FIRST:
        steps = (Start(desired, Slot.CANDIDATE), AwaitReady(Slot.CANDIDATE), *store, Switch(),
                 Drain(Slot.CANDIDATE), Stop(Slot.CANDIDATE))
    else:
        steps = (Hold(), Drain(Slot.ACTIVE), Stop(Slot.ACTIVE), Start(desired, Slot.ACTIVE),
                 AwaitReady(Slot.ACTIVE), *store)
    return Plan(desired, steps, strategy, is_noop=same)
