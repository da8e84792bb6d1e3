"""The rollout record as etcd stores it, and the slot queue as people read it."""

from __future__ import annotations

import json

from corral.core.rollout import Do, MaxUnavailable, Rollout, Step

__all__ = ["dump_record", "parse_record", "split_slots", "step_words"]


def dump_record(record: Rollout) -> str:
    return json.dumps(record.to_json(), indent=1)


def parse_record(raw: bytes | str | None) -> Rollout | None:
    """The record stored as ``raw``; None if there is none or it is not a record (someone
    wrote something else there: it is ignored, not fatal)."""
    if raw is None:
        return None
    try:
        return Rollout.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        return None


def split_slots(holders: list[str], limit: MaxUnavailable, live: int) -> dict[str, list[str]]:
    """Slot keys in order: the first ``limit`` may apply now, the rest wait their turn."""
    n = limit.slots(live)
    return {"applying": holders[:n], "queued": holders[n:]}


def step_words(step: Step, me: str) -> str:
    """A record step that people want in the log, in words."""
    r = step.record
    assert r is not None
    words = {Do.START: f"rollout of revision {r.revision} started",
             Do.CLAIM_CANARY: f"{me} is the canary of revision {r.revision}",
             Do.CLEAR_CANARY: f"the canary of revision {r.revision} is gone; another takes over",
             Do.PROMOTE: f"canary {r.canary} proved revision {r.revision}: rolling on",
             Do.FINISH: f"rollout of revision {r.revision} done"}
    return words[step.do]
