"""Whether a new llama-server fits beside the running one: the rule ``--swap auto`` uses.

Until llama.cpp's own estimator is wired in (issue "Know before you load"), the rule is
deliberately conservative: the new server needs its model file's size plus half again
(context, compute buffers, allocator slack) plus a fixed 256 MiB, all of it out of the
memory available *now*, while the old server still holds its own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from corral.core.steps import Strategy

MIB = 1 << 20
OVERHEAD = 0.5
ALLOWANCE = 256 * MIB


class SwapMode(enum.StrEnum):
    AUTO = "auto"
    START_FIRST = "start-first"
    STOP_FIRST = "stop-first"


@dataclass(frozen=True)
class FitVerdict:
    fits: bool
    reason: str


def fits_beside(new_model_bytes: int | None, available_bytes: int | None) -> FitVerdict:
    """Can a server of ``new_model_bytes`` start while the old one keeps its memory?"""
    if new_model_bytes is None or available_bytes is None:
        return FitVerdict(False, "memory or model size unknown")
    needs = int(new_model_bytes * (1 + OVERHEAD)) + ALLOWANCE
    words = (f"needs ~{needs / MIB:.0f} MiB (model file {new_model_bytes / MIB:.0f} MiB "
             f"+ {OVERHEAD:.0%} + {ALLOWANCE // MIB} MiB), {available_bytes / MIB:.0f} MiB "
             "available beside the running server (conservative rule: file sizes)")
    return FitVerdict(needs <= available_bytes, words)


def choose_strategy(mode: SwapMode, verdict: FitVerdict | None) -> Strategy:
    if mode is SwapMode.START_FIRST:
        return Strategy.START_FIRST
    if mode is SwapMode.STOP_FIRST or verdict is None:
        return Strategy.STOP_FIRST
    return Strategy.START_FIRST if verdict.fits else Strategy.STOP_FIRST
