"""Change history: an append-only JSON-lines audit log in the state directory.

Theory of operation
-------------------
The log listens to the controller's :class:`~corral.observe.events.EventBus`: every
``change`` event (a change's outcome: applied, rejected, not stored, unavailable,
superseded) and every
``start-up`` event becomes one line. The API adds the changes it refused before they joined
a batch (:meth:`AuditLog.refused`). A line says when, who (``source``: ``api``, ``fleet``,
``restart``, ``revert``, ``reload``, ``start-up``; ``client``: the API client's address),
what changed (``diff``: ``{flag: [before, after]}``, plus ``binary`` and ``env:NAME`` keys
when they changed; ``null`` for "not set"), the outcome and error, how long it took and the swap
strategy. The whole configs before and after are kept too, so a change can be reverted
after the controller has forgotten it.

Lines are written with one ``write(2)`` each (a crash of the supervisor loses none) and
fsynced in batches with a bounded loss window: the first line after a quiet second at once,
later ones at most ``fsync_every_s`` (1 s) after they were written, by a timer on the event
loop; so a power cut loses at most the last second's lines, and a flood of refusals costs
one fsync a second, not one a line. Without an event loop every line is fsynced at once. A
rotation and the file's creation fsync the directory too, so the renames survive. When
the file would grow past ``max_bytes`` it is rotated like logrotate does: ``audit.jsonl``
becomes ``audit.jsonl.1``, ``.1`` becomes ``.2``, ... and the oldest beyond ``keep`` is
deleted. :meth:`AuditLog.last` reads the newest lines back across the rotated files,
from the end, block by block. Writing never raises: an audit log that cannot be written
is logged, and the supervisor goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from corral.core.args import LlamaConfig
from corral.observe.events import Event, EventBus

__all__ = ["AuditLog", "config_from_json", "diff"]

log = logging.getLogger("corral.audit")

MAX_BYTES = 5 * 1024 * 1024
KEEP = 3
FSYNC_EVERY_S = 1.0  # the loss window on a power cut
_BLOCK = 64 * 1024

# call_later(delay, callback), like asyncio's loop.call_later
Scheduler = Callable[[float, Callable[[], None]], object]


def diff(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """``{flag: [before, after]}`` for every flag that differs, plus ``binary`` and
    ``env:NAME`` when they do (every value is a pair); ``None`` means not set. Takes the
    configs in :func:`corral.supervisor.changes.config_json`'s form."""
    if before is None or after is None:
        return {}
    out: dict[str, Any] = {}
    if before.get("binary") != after.get("binary"):
        out["binary"] = [before.get("binary"), after.get("binary")]
    args_b, args_a = before.get("args") or {}, after.get("args") or {}
    for key in dict.fromkeys([*args_b, *args_a]):
        if args_b.get(key) != args_a.get(key):
            out[key] = [args_b.get(key), args_a.get(key)]
    env_b, env_a = before.get("env") or {}, after.get("env") or {}
    for name in dict.fromkeys([*env_b, *env_a]):
        if env_b.get(name) != env_a.get(name):
            out[f"env:{name}"] = [env_b.get(name), env_a.get(name)]
    return out


def config_from_json(view: dict[str, Any]) -> LlamaConfig:
    """The inverse of :func:`corral.supervisor.changes.config_json` (for a config read back from the
    log); raises ValueError if ``view`` is not one."""
    binary, args, env = view.get("binary"), view.get("args"), view.get("env") or {}
    if not isinstance(binary, str) or not isinstance(args, dict) or not isinstance(env, dict):
        raise ValueError("not a config")
    for key, value in args.items():
        if not isinstance(key, str) or not (isinstance(value, str) or value is True):
            raise ValueError(f"bad flag {key!r} in a stored config")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError("bad env in a stored config")
    return LlamaConfig(binary, tuple(args.items()), tuple(env.items()))


class AuditLog:
    """Append-only JSON lines at ``path``, rotated by size into ``path.1`` .. ``path.keep``."""

    def __init__(self, path: Path | str, max_bytes: int = MAX_BYTES, keep: int = KEEP,
                 clock: Callable[[], float] = time.time, *,
                 fsync_every_s: float = FSYNC_EVERY_S,
                 monotonic: Callable[[], float] = time.monotonic,
                 call_later: Scheduler | None = None) -> None:
        """``call_later`` schedules the deferred fsync (default: the running event loop's;
        none running: every line is fsynced at once)."""
        self.path = Path(path)
        self.max_bytes = max(1, max_bytes)
        self.keep = max(0, keep)
        self.fsync_every_s = fsync_every_s
        self._clock = clock
        self._monotonic = monotonic
        self._call_later = call_later
        self._fd: int | None = None
        self._size = 0
        self._unsynced = False  # lines written since the last fsync
        self._sync_pending = False  # a deferred fsync is scheduled
        self._last_sync = -float("inf")

    # ---- writing -------------------------------------------------------------------------

    def listen_to(self, events: EventBus) -> None:
        """Write a line for each change outcome and start-up that ``events`` carries."""
        events.listen(self.on_event)

    def on_event(self, event: Event) -> None:
        if event.kind not in ("change", "start-up"):
            return
        d = event.data
        before, after = d.get("before"), d.get("after")
        self.write({
            "time": event.time, "kind": event.kind, "id": d.get("change"),
            "source": d.get("source", event.kind), "client": d.get("client"),
            "outcome": d.get("outcome"), "error": d.get("error"),
            "duration_s": d.get("duration_s"), "strategy": d.get("strategy"),
            "restarted": d.get("restarted"), "diff": diff(before, after),
            "before": before, "after": after, "event_id": event.id,
        })

    def refused(self, client: str | None, reason: str, args: Any = None) -> None:
        """A change the API refused before it joined a batch (invalid, not allowed, ...)."""
        self.write({
            "time": self._clock(), "kind": "refused", "id": None, "source": "api",
            "client": client, "outcome": "refused", "error": reason, "duration_s": 0.0,
            "strategy": None, "restarted": False, "diff": {}, "request": args,
        })

    def write(self, entry: dict[str, Any]) -> None:
        try:
            line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
            self._rotate_if_full(len(line))
            fd = self._open()
            os.write(fd, line)  # O_APPEND, unbuffered: nothing is left in a buffer
            self._size += len(line)
            self._unsynced = True
            self._sync_soon()
        except OSError as exc:
            log.error("cannot write the audit log %s: %s", self.path, exc)
            self.close()

    def _sync_soon(self) -> None:
        """fsync now, or when ``fsync_every_s`` has passed since the last one."""
        if self._sync_pending:
            return  # the scheduled fsync covers this line too
        wait = self._last_sync + self.fsync_every_s - self._monotonic()
        later = self._call_later or _running_loop_call_later()
        if wait <= 0 or later is None:
            self._sync()
            return
        self._sync_pending = True
        later(wait, self._sync_due)

    def _sync_due(self) -> None:
        self._sync_pending = False
        self._sync()

    def _sync(self) -> None:
        if self._fd is None or not self._unsynced:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            log.error("cannot fsync the audit log %s: %s", self.path, exc)
        self._unsynced = False
        self._last_sync = self._monotonic()

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
            self._size = os.fstat(self._fd).st_size
            if created:
                _fsync_dir(self.path.parent)
        return self._fd

    def _rotate_if_full(self, adding: int) -> None:
        self._open()
        if self._size == 0 or self._size + adding <= self.max_bytes:
            return
        self.close()
        if self.keep == 0:
            self.path.unlink(missing_ok=True)
            return
        self._rotated(self.keep).unlink(missing_ok=True)
        for n in range(self.keep - 1, 0, -1):
            if self._rotated(n).exists():
                os.replace(self._rotated(n), self._rotated(n + 1))
        os.replace(self.path, self._rotated(1))
        _fsync_dir(self.path.parent)

    def _rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def close(self) -> None:
        """fsync what is not yet, and close (the next line opens the file again)."""
        self._sync()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    # ---- reading -------------------------------------------------------------------------

    def files(self) -> list[Path]:
        """The log's files, newest first."""
        return [p for p in (self.path, *(self._rotated(n) for n in range(1, self.keep + 1)))
                if p.exists()]

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every readable line, newest first (a torn or foreign line is skipped)."""
        for path in self.files():
            try:
                for raw in _reverse_lines(path):
                    try:
                        entry = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(entry, dict):
                        yield entry
            except OSError as exc:
                log.warning("cannot read the audit log %s: %s", path, exc)

    def last(self, n: int) -> list[dict[str, Any]]:
        """The newest ``n`` entries, newest first, across the rotated files."""
        out: list[dict[str, Any]] = []
        if n <= 0:
            return out
        for entry in self.entries():
            out.append(entry)
            if len(out) >= n:
                break
        return out

    def find(self, change_id: str) -> dict[str, Any] | None:
        """The newest outcome of change ``change_id`` (ids are unique across runs:
        :class:`corral.supervisor.changes.ChangeIds`)."""
        for entry in self.entries():
            if entry.get("kind") == "change" and entry.get("id") == change_id:
                return entry
        return None


def _running_loop_call_later() -> Scheduler | None:
    try:
        return asyncio.get_running_loop().call_later
    except RuntimeError:
        return None


def _fsync_dir(path: Path) -> None:
    """Make a file's creation or rename in ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        log.error("cannot open %s to fsync it: %s", path, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        log.error("cannot fsync the directory %s: %s", path, exc)
    finally:
        os.close(fd)


def _reverse_lines(path: Path) -> Iterator[bytes]:
    """The lines of ``path``, last first, reading blocks from the end."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        rest = b""
        while end > 0:
            start = max(0, end - _BLOCK)
            f.seek(start)
            block = f.read(end - start) + rest
            end = start
            lines = block.split(b"\n")
            rest = lines.pop(0)  # may continue in the previous block
            for line in reversed(lines):
                if line.strip():
                    yield line
        if rest.strip():
            yield rest
