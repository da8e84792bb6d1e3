"""From a batch of changes to what the applier must do."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from corral.core.args import Change, LlamaConfig, apply_change, merge_changes


@dataclass(frozen=True)
class Plan:
    desired: LlamaConfig
    rollback_to: LlamaConfig
    is_noop: bool


def plan_batch(last_good: LlamaConfig, is_serving: bool, batch: Sequence[Change]) -> Plan:
    """``last_good ⊕ merged batch``, rolled back to ``last_good`` on failure.

    A no-op only while a server is up with exactly that config; in backoff or FATAL the same
    config is started again (that is how a user retries).
    """
    desired = apply_change(last_good, merge_changes(batch))
    # Same flags and values in another order is still the same server: no restart.
    same = desired.binary == last_good.binary and desired.as_dict() == last_good.as_dict()
    return Plan(last_good if same else desired, last_good, is_noop=is_serving and same)
