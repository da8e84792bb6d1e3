"""Operating without editing JSON: revert a change, re-read the stored config (SIGHUP).

Both end as a whole-config change (:meth:`corral.core.args.Change.whole`) submitted to the
controller like any API change, so they are batched, pre-flighted, applied (or rejected
with nothing lost) and stored by the same transaction. A restart is the controller's own
entry point (:meth:`corral.supervisor.controller.Controller.restart`).

``SIGHUP`` must not do I/O in a signal handler: :class:`Reloader` is a task that waits for
:meth:`Reloader.request` (called from ``loop.add_signal_handler``) and then reads the store.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from corral.core.args import Change, LlamaConfig
from corral.errors import CorralError
from corral.observe.audit import AuditLog, config_from_json
from corral.supervisor.changes import ChangeRecord

if TYPE_CHECKING:
    from corral.supervisor.view import Supervisor

__all__ = ["RELOAD", "REVERT", "Reloader", "admit_whole", "reload_from_store", "before_of"]

log = logging.getLogger("corral")

REVERT = "revert"  # ChangeRecord.source of a revert
RELOAD = "reload"  # ... and of a config re-read from the store on SIGHUP


async def admit_whole(controller: Supervisor, config: LlamaConfig) -> None:
    """The checks an API change passes before it joins a batch (least-privilege rules,
    then stage-1 pre-flight); raises CorralError."""
    controller.checks.admit_binary(config.binary)
    await controller.checks.admit(config)
    await controller.check(config, fit=False)


class NoBefore(CorralError):
    """The change is known, but no config was in effect before it (it never ran)."""


def before_of(controller: Supervisor, audit: AuditLog | None,
              change_id: str) -> LlamaConfig | None:
    """The config that was in effect when change ``change_id``'s batch was taken: from the
    controller's record, else from the audit log. None if the change is unknown; raises
    :class:`NoBefore` if it is known but never reached a batch."""
    record = controller.record(change_id)
    if record is not None:
        if record.before is None:
            raise NoBefore(f"change {change_id} has not been applied yet "
                           f"({record.outcome.value}): nothing to revert")
        return record.before
    entry = audit.find(change_id) if audit is not None else None
    if entry is None:
        return None
    view = entry.get("before")
    if not isinstance(view, dict):
        raise NoBefore(f"change {change_id} has no config before it in the audit log")
    try:
        return config_from_json(view)
    except ValueError as exc:
        raise NoBefore(f"the audit log's config before {change_id} is unreadable: "
                       f"{exc}") from None


async def reload_from_store(controller: Supervisor,
                            audit: AuditLog | None = None) -> ChangeRecord | None:
    """Read the stored config again (a hand edit of the TOML file) and submit it as a
    whole-config change; None when there is nothing to do or it is refused (logged, and
    audited as a refusal)."""
    if controller.status().fleet is not None:
        log.info("SIGHUP: in a fleet a new config arrives as a rollout; nothing re-read")
        return None
    try:
        stored = await controller.store.load(controller.name)
    except CorralError as exc:
        log.error("SIGHUP: cannot read the stored config: %s; nothing changed", exc)
        return None
    if stored is None:
        log.warning("SIGHUP: nothing is stored under %r; nothing changed", controller.name)
        return None
    if stored.config == controller.last_good:
        log.info("SIGHUP: the stored config is the one running; nothing to apply")
        return None
    try:
        await admit_whole(controller, stored.config)
    except CorralError as exc:
        log.error("SIGHUP: the stored config is refused: %s; the running config stays", exc)
        controller.events.emit("refused", source=RELOAD, client="SIGHUP", error=str(exc))
        if audit is not None:
            audit.refused("SIGHUP", str(exc), {"reload": controller.store.description})
        return None
    record = controller.submit(Change.whole(stored.config), source=RELOAD)
    log.info("SIGHUP: applying the stored config as change %s: %s", record.id,
             " ".join(stored.config.argv()))
    record.done.add_done_callback(lambda _: _log_outcome(record))
    return record


def _log_outcome(record: ChangeRecord) -> None:
    if record.error:
        log.error("SIGHUP: change %s %s: %s", record.id, record.outcome.value, record.error)
    else:
        log.info("SIGHUP: change %s %s", record.id, record.outcome.value)


class Reloader:
    """Runs :func:`reload_from_store` after each :meth:`request` (one at a time; requests
    made meanwhile are folded into one more read)."""

    def __init__(self, controller: Supervisor, audit: AuditLog | None = None) -> None:
        self.controller = controller
        self.audit = audit
        self._wake = asyncio.Event()
        self.reloads = 0  # reads done, for tests

    def request(self) -> None:
        """Ask for a re-read (safe from ``loop.add_signal_handler``)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await reload_from_store(self.controller, self.audit)
            except Exception:  # noqa: BLE001 - a failed re-read must not end the supervisor
                log.exception("SIGHUP: re-reading the stored config failed")
            self.reloads += 1
