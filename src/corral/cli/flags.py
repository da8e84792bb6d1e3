"""Flags that ``supervise`` and ``serve`` share: one definition each (name, default, help)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from corral.cli.loop import LOOPS

Group = argparse.ArgumentParser | argparse._ArgumentGroup


def positive(kind: type[float] | type[int]) -> Callable[[str], float | int]:
    """An argparse type: a number that is not negative."""
    def parse(text: str) -> float | int:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    return parse


def add_hold_flags(g: Group) -> None:
    """What the front door does with requests while nothing (or something else) serves."""
    g.add_argument("--drain-timeout", type=positive(float), default=30.0, metavar="S",
                   help="seconds to let in-flight requests finish before a server is stopped "
                   "(default: %(default)g)")
    g.add_argument("--max-held", type=int, default=256, metavar="N",
                   help="requests held at most while nothing is ready; more get 503 "
                   "(default: %(default)s)")
    g.add_argument("--hold-timeout", type=positive(float), default=120.0, metavar="S",
                   help="seconds a request may be held before it gets 503 "
                   "(default: %(default)g)")


def add_start_flags(g: Group) -> None:
    """How long a llama-server may take to start and to stop, and when to give up."""
    g.add_argument("--ready-timeout", type=positive(float), default=300.0, metavar="S",
                   help="seconds llama-server may take to answer /health 200 "
                   "(default: %(default)g)")
    g.add_argument("--stop-timeout", type=positive(float), default=10.0, metavar="S",
                   help="seconds between SIGTERM and SIGKILL when stopping "
                   "(default: %(default)g)")
    g.add_argument("--max-start-failures", type=int, default=5, metavar="N",
                   help="consecutive failed starts before giving up (FATAL) "
                   "(default: %(default)s); delays double from 0.5 s to 30 s")


def add_output_flags(g: Group) -> None:
    """llama-server's output, Corral's log level, and the event loop."""
    g.add_argument("--quiet-llama", action="store_true",
                   help="do not echo llama-server's output (it is still kept for errors)")
    g.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="(default: info)")
    g.add_argument("--loop", choices=LOOPS, default="auto",
                   help="event loop: auto = uvloop when installed (less CPU per proxied "
                   "request), else asyncio's (default: %(default)s)")
