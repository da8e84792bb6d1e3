"""llama-server's output: drained as fast as it comes, kept in a bounded ring, echoed.

The child writes to a pipe; if nobody reads, it blocks once the pipe (64 KiB) is full.
So a reader task drains it in large chunks at all times, keeps the last ``max_lines``
lines (each cut to ``max_line_chars``) for error reports, and echoes them to the log. A
``sink`` (the launcher sets one: ``LineBus.add`` for ``/v1/logs``) gets each line too.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

log = logging.getLogger("corral.llama")


class OutputRing:
    def __init__(self, max_lines: int = 200, max_line_chars: int = 2000) -> None:
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._max_line_chars = max_line_chars
        self.sink: Callable[[str], None] | None = None

    def add(self, line: str) -> None:
        if len(line) > self._max_line_chars:
            line = line[: self._max_line_chars] + " [...]"
        self._lines.append(line)
        if self.sink is not None:
            self.sink(line)

    def tail(self, n: int = 20) -> list[str]:
        return list(self._lines)[-n:]


async def drain(stream: asyncio.StreamReader, ring: OutputRing, prefix: str, echo: bool) -> None:
    """Read ``stream`` until EOF into ``ring``; never blocks the writer for long."""
    partial = b""
    while chunk := await stream.read(1 << 16):
        *lines, partial = (partial + chunk).split(b"\n")
        if len(partial) > 1 << 16:  # a runaway line without newline: cut it here
            lines.append(partial)
            partial = b""
        for raw in lines:
            _record(raw, ring, prefix, echo)
    if partial:
        _record(partial, ring, prefix, echo)


def _record(raw: bytes, ring: OutputRing, prefix: str, echo: bool) -> None:
    line = raw.decode("utf-8", "replace").rstrip("\r")
    ring.add(line)
    if echo:
        log.info("%s %s", prefix, line)
