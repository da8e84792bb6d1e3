"""Which models to load and which to evict, for ``corral serve``: pure, no I/O, no clock.

The scheduler (``corral.serve.scheduler``) hands :func:`plan` a snapshot of every model and
the limits, and carries out what comes back; it asks again whenever anything changes (a
request arrives or ends, a load or an unload finishes, a timer fires). The rules:

- A model with held requests and no server gets loaded when it fits: its memory need (per
  device, from the estimate of "know before you load", margin included) in what the limits
  leave after every resident model, and under the count limit. Longest-waiting first; a
  model that must wait keeps its place (its need is reserved), so smaller models behind it
  load only into memory it does not need.
- To make room, idle models are evicted first, least recently used first. *Idle* means no
  request in flight, none held, and the last one ended at least ``idle_grace_s`` ago: an
  agent's next request usually follows its last within a second, and evicting between two
  of them is how swap thrash starts. Pinned models are never evicted.
- A busy model keeps serving until the waiting model's oldest request has waited
  ``max_wait_s``; then it is evicted for fairness (the caller holds its new requests for its
  next turn, drains, and stops it). That bounds both the wait (``max_wait_s`` + drain +
  load) and the thrash (one swap per ``max_wait_s`` per contending pair).
- A model that cannot fit even with every other model gone is refused, with the figures;
  so is one that cannot fit beside the pinned models (what it holds is answered at once,
  not after ``--hold-timeout``; it loads again once a pinned model is unloaded).
- An idle model past its ``ttl_s`` (not 0) is unloaded.

Models being unloaded still hold their memory until their server is gone.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from corral.errors import UsageError

HOST = "host"


class Phase(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


OCCUPYING = frozenset({Phase.LOADING, Phase.LOADED, Phase.UNLOADING})


class Reason(enum.StrEnum):
    """Why a model was evicted (the ``reason`` label of the evictions metric)."""

    TTL = "ttl"
    MEMORY = "memory"
    COUNT = "count"
    FAIRNESS = "fairness"
    ADMIN = "admin"


@dataclass(frozen=True)
class ModelState:
    """One model as the scheduler sees it at one instant (times in seconds, relative)."""

    id: str
    phase: Phase
    need_mib: Mapping[str, float] = field(default_factory=dict)  # device -> MiB; {} unknown
    in_flight: int = 0
    held: int = 0
    oldest_held_s: float = 0.0  # how long the oldest held request has waited
    idle_s: float | None = None  # since the last request ended; None: never used
    pinned: bool = False
    ttl_s: float = 0.0  # 0: never unloaded for idleness

    def is_idle(self, grace_s: float) -> bool:
        return (self.in_flight == 0 and self.held == 0
                and (self.idle_s is None or self.idle_s >= grace_s))


@dataclass(frozen=True)
class Limits:
    memory_mib: Mapping[str, float] = field(default_factory=dict)  # device -> MiB; absent: no limit
    max_models: int | None = None
    max_wait_s: float = 10.0
    idle_grace_s: float = 1.0


@dataclass(frozen=True)
class Load:
    id: str


@dataclass(frozen=True)
class Evict:
    id: str
    reason: Reason


@dataclass(frozen=True)
class Refuse:
    """``id`` can never fit: answer what it holds with ``why``."""

    id: str
    why: str


Action = Load | Evict | Refuse


def plan(models: Sequence[ModelState], limits: Limits) -> list[Action]:
    """What to do now; see the module's docstring for the rules."""
    actions: list[Action] = []
    by_id = {m.id: m for m in models}
    for m in models:
        if (m.phase is Phase.LOADED and not m.pinned and m.ttl_s > 0
                and m.is_idle(0.0) and m.idle_s is not None and m.idle_s >= m.ttl_s):
            actions.append(Evict(m.id, Reason.TTL))
    leaving = {a.id for a in actions}
    used = _used(m for m in models if m.phase in OCCUPYING and m.id not in leaving)
    count = sum(1 for m in models if m.phase in OCCUPYING and m.id not in leaving)
    waiting = sorted((m for m in models if m.phase is Phase.UNLOADED and m.held > 0),
                     key=lambda m: -m.oldest_held_s)
    pinned = [m for m in models if m.pinned and m.phase in OCCUPYING]
    for want in waiting:
        if not _fits_alone(want.need_mib, limits):
            actions.append(Refuse(want.id, _too_big(want, limits)))
            continue
        if pinned and not _fits_beside(pinned, want, limits):
            actions.append(Refuse(want.id, _pinned_out(pinned, want)))
            continue
        if _fits(used, want.need_mib, limits) and _count_ok(count, limits):
            actions.append(Load(want.id))
            used, count = _plus(used, want.need_mib), count + 1
            continue
        victims = _victims(want, by_id, used, count, limits, leaving)
        for victim, reason in victims:
            actions.append(Evict(victim.id, reason))
            leaving.add(victim.id)
        # Its place is kept: what it needs is reserved, whether or not room is being made.
        used, count = _plus(used, want.need_mib), count + 1
    return actions


def _victims(want: ModelState, by_id: Mapping[str, ModelState], used: dict[str, float],
             count: int, limits: Limits, leaving: set[str]) -> list[tuple[ModelState, Reason]]:
    """The evictions that make room for ``want`` (none if it cannot be made yet)."""
    candidates = [m for m in by_id.values()
                  if m.phase is Phase.LOADED and not m.pinned and m.id not in leaving]
    idle = sorted((m for m in candidates if m.is_idle(limits.idle_grace_s)),
                  key=lambda m: -(m.idle_s if m.idle_s is not None else float("inf")))
    pool = idle
    if want.oldest_held_s >= limits.max_wait_s:
        busy = [m for m in candidates if not m.is_idle(limits.idle_grace_s)]
        pool = idle + sorted(busy, key=lambda m: -(m.idle_s or 0.0))
    # Anything already on its way out frees its memory soon: count it as gone.
    freeing = [by_id[i] for i in leaving if i in by_id] + \
        [m for m in by_id.values() if m.phase is Phase.UNLOADING]
    room, n = dict(used), count
    for m in {m.id: m for m in freeing}.values():
        room, n = _minus(room, m.need_mib), n - 1
    chosen: list[tuple[ModelState, Reason]] = []
    for m in pool:
        if _fits(room, want.need_mib, limits) and _count_ok(n, limits):
            break
        reason = (Reason.FAIRNESS if not m.is_idle(limits.idle_grace_s)
                  else Reason.COUNT if not _count_ok(n, limits) else Reason.MEMORY)
        chosen.append((m, reason))
        room, n = _minus(room, m.need_mib), n - 1
    if not (_fits(room, want.need_mib, limits) and _count_ok(n, limits)):
        return []  # even these would not be enough: evict nothing yet
    return chosen


def _used(models: Iterable[ModelState]) -> dict[str, float]:
    total: dict[str, float] = {}
    for m in models:
        total = _plus(total, m.need_mib)
    return total


def _plus(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    out = dict(a)
    for device, mib in b.items():
        out[device] = out.get(device, 0.0) + mib
    return out


def _minus(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    return _plus(a, {d: -mib for d, mib in b.items()})


def _fits(used: Mapping[str, float], need: Mapping[str, float], limits: Limits) -> bool:
    return all(used.get(d, 0.0) + mib <= limits.memory_mib[d]
               for d, mib in need.items() if d in limits.memory_mib)


def _fits_alone(need: Mapping[str, float], limits: Limits) -> bool:
    return _fits({}, need, limits) and (limits.max_models is None or limits.max_models >= 1)


def _fits_beside(pinned: Sequence[ModelState], want: ModelState, limits: Limits) -> bool:
    """Could ``want`` fit with every model gone but the pinned ones?"""
    return (_fits(_used(pinned), want.need_mib, limits)
            and _count_ok(len(pinned), limits))


def _pinned_out(pinned: Sequence[ModelState], want: ModelState) -> str:
    names = ", ".join(m.id for m in pinned)
    return (f"model {want.id!r} does not fit beside the pinned model(s) {names} "
            "(--max-memory/--max-models); unload one (POST /v1/models/ID/unload) or unpin it")


def _count_ok(count: int, limits: Limits) -> bool:
    return limits.max_models is None or count + 1 <= limits.max_models


def _too_big(m: ModelState, limits: Limits) -> str:
    over = [f"{d} {m.need_mib[d]:.0f} MiB > {limits.memory_mib[d]:.0f} MiB"
            for d in m.need_mib if d in limits.memory_mib and m.need_mib[d] > limits.memory_mib[d]]
    return (f"model {m.id!r} does not fit even alone: "
            f"{', '.join(over) or 'no model may be loaded (--max-models)'} (--max-memory)")


_UNITS = {"": 1 / (1024 * 1024), "b": 1 / (1024 * 1024), "k": 1 / 1024, "kb": 1 / 1024,
          "kib": 1 / 1024, "m": 1.0, "mb": 1.0, "mib": 1.0, "g": 1024.0, "gb": 1024.0,
          "gib": 1024.0, "t": 1024.0 ** 2, "tb": 1024.0 ** 2, "tib": 1024.0 ** 2}


def parse_memory(spec: str) -> dict[str, float]:
    """``--max-memory``: ``8GiB`` (the host) or ``host=12GiB,cuda0=20GiB``; MiB per device."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        device, sep, size = part.rpartition("=")
        device = device.strip() if sep else HOST
        number = size.strip()
        digits = number.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
        unit = number[len(digits):].lower()
        try:
            value = float(digits)
        except ValueError:
            value = -1.0
        if unit not in _UNITS or value <= 0 or not device:
            raise UsageError(f"--max-memory: cannot read {part!r}: use a size like 1500MiB "
                             "or 8GiB, or per device: host=12GiB,cuda0=20GiB")
        out[device] = value * _UNITS[unit]
    if not out:
        raise UsageError("--max-memory is empty")
    return out
