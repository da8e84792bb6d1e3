"""Fleet rollouts: what one supervisor should do next about a fleet config. No I/O.

Theory of operation
-------------------
Every write of ``/corral/configs/<name>`` is a revision (its etcd ``mod_revision``). The
rollout of a revision is one record, ``/corral/rollouts/<name>``: which revision, its
canary, each instance's progress, and the last config that succeeded everywhere (``good``),
which is what a failed rollout reverts the key to. Instances apply a revision only while
they hold one of the ``--max-unavailable`` slots (etcd's semaphore recipe: slot keys under
each holder's lease, ordered by ``create_revision``; the first *limit* of them hold).

Each supervisor looks at the same facts (a :class:`View`) and :func:`next_step` says what
it should do next: one step, after which the facts are read again. Every step is either
idempotent or a compare-and-swap on the record, so two supervisors acting on the same view
cannot both win, and a step lost with a crash is simply decided again by whoever looks
next (level-triggered, like Kubernetes controllers). The phases of a record:

``canary``  one instance (the first to hold a slot and claim it) applies the revision; the
            others wait. Once the canary has been RUNNING for ``--canary-seconds`` it
            promotes the record. A canary whose registration is gone (dead, partitioned past
            its lease) is cleared, and the next slot holder claims the role.
``rolling`` every instance that does not run the revision yet takes a slot and applies it.
``done``    every live instance runs it (or failed it after someone succeeded). An instance
            that does not (a late joiner, or one back after its lease expired, as after an
            etcd outage) reopens it: ``done`` is only ever said of the fleet as it is.
``failed``  the first apply of the revision failed: nobody else ever starts it, and the key
            goes back to ``good`` (guarded by its mod_revision: a newer write is never
            clobbered).

A record written together with its config (a change posted to one supervisor's API, which
is tried on that supervisor before it is written) cannot know its own revision yet: it says
0 and matches the config by digest until the next instance that looks fills the number in.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "MaxUnavailable",
    "Do",
    "Phase",
    "Progress",
    "Rollout",
    "Step",
    "Target",
    "View",
    "next_step",
    "record_failure",
    "revert_target",
]


class Phase(enum.StrEnum):
    CANARY = "canary"
    ROLLING = "rolling"
    DONE = "done"
    FAILED = "failed"


class Progress(enum.StrEnum):
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class MaxUnavailable:
    """``--max-unavailable``: a count, or a percentage of the live instances."""

    count: int = 1
    percent: float | None = None

    @staticmethod
    def parse(text: str) -> MaxUnavailable:
        text = text.strip()
        try:
            if text.endswith("%"):
                percent = float(text[:-1])
                if not 0 < percent <= 100:
                    raise ValueError
                return MaxUnavailable(percent=percent)
            count = int(text)
            if count < 1:
                raise ValueError
            return MaxUnavailable(count)
        except ValueError:
            raise ValueError(f"expected a count >= 1 or a percentage in (0, 100]%, "
                             f"got {text!r}") from None

    def slots(self, live: int) -> int:
        """How many may apply at once among ``live`` instances: rounded down, at least 1."""
        if self.percent is None:
            return self.count
        return max(1, math.floor(self.percent * live / 100))

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


@dataclass(frozen=True)
class Target:
    """The fleet config as written: its revision and a digest of its content."""

    revision: int
    digest: str
    value: str = ""  # as stored: what a later failed rollout may revert to


@dataclass(frozen=True)
class Rollout:
    """The record at ``/corral/rollouts/<name>``."""

    revision: int
    digest: str
    config: str  # the config's stored value: what a later failed rollout reverts to
    phase: Phase
    canary: str | None = None
    progress: Mapping[str, str] = field(default_factory=dict)  # instance -> Progress
    reasons: Mapping[str, str] = field(default_factory=dict)  # instance -> why it failed
    reason: str | None = None  # why the rollout failed
    good: str | None = None  # the last config that succeeded everywhere (stored value)
    good_revision: int | None = None
    started_at: str = ""
    ended_at: str | None = None

    def matches(self, target: Target) -> bool:
        return self.digest == target.digest and self.revision in (0, target.revision)

    def done_by(self, instance: str) -> bool:
        return self.progress.get(instance) == Progress.DONE

    def with_progress(self, instance: str, progress: Progress,
                      reason: str | None = None) -> Rollout:
        reasons = dict(self.reasons)
        if reason:
            reasons[instance] = reason
        return replace(self, progress={**self.progress, instance: progress.value},
                       reasons=reasons)

    def last_success(self) -> tuple[str | None, int | None]:
        """What a rollout that supersedes this one may revert to."""
        if self.phase is Phase.DONE:
            return self.config, self.revision or None  # 0: written with its config, unnumbered
        return self.good, self.good_revision

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "digest": self.digest, "phase": self.phase.value,
                "canary": self.canary, "progress": dict(self.progress),
                "reasons": dict(self.reasons), "reason": self.reason,
                "started_at": self.started_at, "ended_at": self.ended_at,
                "good_revision": self.good_revision, "config": self.config, "good": self.good}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Rollout:
        return Rollout(
            revision=int(data["revision"]), digest=str(data["digest"]),
            config=str(data["config"]), phase=Phase(data["phase"]),
            canary=data.get("canary"), progress=dict(data.get("progress") or {}),
            reasons=dict(data.get("reasons") or {}), reason=data.get("reason"),
            good=data.get("good"), good_revision=data.get("good_revision"),
            started_at=str(data.get("started_at") or ""), ended_at=data.get("ended_at"))


@dataclass(frozen=True)
class View:
    """What one supervisor knows when it decides."""

    me: str
    target: Target | None
    record: Rollout | None
    holders: tuple[str, ...]  # slot keys, oldest first (create_revision order)
    live: frozenset[str]  # registered instances
    in_sync: bool  # this instance runs the target already
    runs_record: bool = False  # ... runs the record's config (the record may be older)
    max_unavailable: MaxUnavailable = MaxUnavailable()
    canary_seconds: float = 10.0
    running_for: float | None = None  # seconds RUNNING on the current config

    @property
    def holding(self) -> bool:
        limit = self.max_unavailable.slots(len(self.live))
        return self.me in self.holders[:limit]

    @property
    def queued(self) -> bool:
        return self.me in self.holders


class Do(enum.StrEnum):
    NOTHING = "nothing"  # wait for the next change of the facts
    WAIT = "wait"  # ... or until ``after`` seconds have passed
    SEED = "seed"  # nothing stored yet: store what this instance runs (if still absent)
    START = "start"  # write a new record for the target (CAS)
    NUMBER = "number"  # CAS revision := the target's (a record written with its config)
    ENQUEUE = "enqueue"  # put this instance's slot key (under its lease)
    RELEASE = "release"  # delete this instance's slot key
    CLAIM_CANARY = "claim canary"  # CAS canary := me
    CLEAR_CANARY = "clear canary"  # CAS canary := None (its holder is gone)
    APPLY = "apply"  # apply the target here
    MARK_DONE = "mark done"  # CAS progress[me] := done
    PROMOTE = "promote"  # CAS phase := rolling (the canary proved itself)
    FINISH = "finish"  # CAS phase := done
    REOPEN = "reopen"  # CAS phase := rolling (a live instance does not run it: not done)
    REVERT = "revert"  # put good back into the key if it still holds the failed revision


@dataclass(frozen=True)
class Step:
    do: Do
    record: Rollout | None = None  # the record to write, for CAS steps
    after: float | None = None  # for WAIT


NOTHING = Step(Do.NOTHING)


def next_step(v: View, my_config: str | None = None, now: str = "") -> Step:
    """What this instance should do next. ``my_config`` is the stored form of what it runs
    (the rollback target of a first rollout); ``now`` stamps records (ISO time)."""
    t, r = v.target, v.record
    if t is None:
        return Step(Do.SEED) if my_config is not None else _release(v)
    if r is None or not r.matches(t):
        return _supersede(v, t, r, my_config, now)
    if r.revision == 0:
        return Step(Do.NUMBER, replace(r, revision=t.revision))
    if r.phase is Phase.FAILED:
        return Step(Do.REVERT) if r.good is not None else _release(v)
    if v.in_sync and not r.done_by(v.me):
        return Step(Do.MARK_DONE, r.with_progress(v.me, Progress.DONE))
    if r.progress.get(v.me) == Progress.FAILED and not v.in_sync:
        return _release(v)  # tried here and failed: never again for this revision
    if r.phase is Phase.DONE:
        if not v.in_sync:  # joined, or came back, after it was done: not done any more
            return Step(Do.REOPEN, replace(r, phase=Phase.ROLLING, ended_at=None))
        return _take_part(v)
    if r.phase is Phase.CANARY:
        return _canary_phase(v, r, now)
    if v.in_sync:
        if v.queued:
            return Step(Do.RELEASE)
        if all(i in r.progress for i in v.live):
            return Step(Do.FINISH, replace(r, phase=Phase.DONE, ended_at=now))
        return NOTHING
    return _take_part(v)


def _supersede(v: View, t: Target, r: Rollout | None, my_config: str | None,
               now: str) -> Step:
    """A write that has no record yet. The record still holds the rollout before it: first
    close its books (who runs it, whether it is done), once nobody is still applying it,
    so that the new record knows what the fleet really runs; then start the new one."""
    open_books = r is not None and r.phase in (Phase.CANARY, Phase.ROLLING)
    if r is not None and open_books:
        if v.runs_record and r.progress.get(v.me) is None:
            return Step(Do.MARK_DONE, r.with_progress(v.me, Progress.DONE))
        if all(r.done_by(i) for i in v.live):
            return Step(Do.FINISH, replace(r, phase=Phase.DONE, ended_at=now))
    if v.in_sync:
        return _release(v)  # nothing to do here; one that must apply starts the record
    if v.queued:
        return Step(Do.RELEASE)  # a slot taken for the older revision is not for this one
    limit = v.max_unavailable.slots(len(v.live))
    if open_books and any(h != v.me for h in v.holders[:limit]):
        # A slot holder may be applying the older revision right now: its outcome (or its
        # lease running out) decides what the fleet runs, and so what to revert to.
        return NOTHING
    good, good_revision = revert_target(r, v.live) if r is not None else (my_config, None)
    phase = Phase.CANARY if v.canary_seconds > 0 else Phase.ROLLING
    return Step(Do.START, Rollout(t.revision, t.digest, t.value, phase, good=good,
                                  good_revision=good_revision, started_at=now))


def _canary_phase(v: View, r: Rollout, now: str) -> Step:
    if r.canary is not None and r.canary != v.me and r.canary not in v.live:
        return Step(Do.CLEAR_CANARY, replace(r, canary=None))
    if r.canary is None:
        if v.in_sync:
            if all(r.done_by(i) for i in v.live):
                return Step(Do.FINISH, replace(r, phase=Phase.DONE, ended_at=now))
            return _release(v)  # a slot held here would block whoever must apply
        if v.holding:
            return Step(Do.CLAIM_CANARY, replace(r, canary=v.me))
        return NOTHING if v.queued else Step(Do.ENQUEUE)
    if r.canary != v.me:
        # Wait without a slot: with a percentage, a death can shrink the slots so that
        # the canary is no longer among the holders, and it must get one back.
        return _release(v)
    if not v.in_sync:
        return _take_part(v)
    proven = v.running_for or 0.0
    if proven < v.canary_seconds:
        return Step(Do.WAIT, after=v.canary_seconds - proven)
    return Step(Do.PROMOTE, replace(r, phase=Phase.ROLLING))


def _take_part(v: View) -> Step:
    if v.in_sync:
        return _release(v)
    if v.holding:
        return Step(Do.APPLY)
    return NOTHING if v.queued else Step(Do.ENQUEUE)


def _release(v: View) -> Step:
    return Step(Do.RELEASE) if v.queued else NOTHING


def revert_target(previous: Rollout, runs_it: frozenset[str]) -> tuple[str | None, int | None]:
    """What a rollout that supersedes ``previous`` reverts to if it fails: ``previous``'s
    config when every instance in ``runs_it`` (the live ones) has applied it, whether or not
    its record said ``done`` yet; otherwise the newest config that did reach ``done``."""
    if (previous.phase in (Phase.CANARY, Phase.ROLLING) and runs_it
            and all(previous.done_by(i) for i in runs_it)):
        return previous.config, previous.revision or None
    return previous.last_success()


def record_failure(r: Rollout, me: str, reason: str, now: str = "") -> Rollout:
    """The record after this instance failed to apply it. The first failure of a revision
    (nobody has run it yet: the canary, or anyone with ``--canary-seconds 0``) fails the
    whole rollout; a later one is this host's alone."""
    failed = r.with_progress(me, Progress.FAILED, reason)
    if any(p == Progress.DONE for p in r.progress.values()):
        return failed
    return replace(failed, phase=Phase.FAILED, reason=f"{me}: {reason}", ended_at=now)
